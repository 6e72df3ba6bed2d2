//! Giving memory back after a large request. glibc's malloc keeps memory a
//! request freed in its arenas (the router thread allocates the frames, the HTTP
//! threads free them), so a server that answered one large request would keep its
//! peak RSS while idle. Two measures (docs/PROTOCOL.md, "Memory"):
//! - [`fix_mmap_threshold`]: buffers of [`MMAP_THRESHOLD`] or more (frames, a
//!   tensor's gathered rows, an answer) are always mapped on their own, so freeing
//!   one returns it to the system at once. glibc would otherwise raise the
//!   threshold to the largest buffer freed so far (up to 32 MiB) and keep later
//!   ones in its heap.
//! - after a request that held or streamed more than [`TRIM_AFTER`] bytes of
//!   latents, `malloc_trim(0)`, which hands every arena's free pages back.

use axum::body::Bytes;

/// Allocations from this size on are mapped on their own (256 KiB).
pub(crate) const MMAP_THRESHOLD: usize = 256 << 10;

/// Fix glibc's mmap threshold at [`MMAP_THRESHOLD`] for this process (the
/// `serve` process: called once when it starts).
pub(crate) fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; M_MMAP_THRESHOLD takes
    // any size up to 32 MiB on 64-bit.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}

/// Latent bytes a request must have held or streamed for a trim after it.
pub(crate) const TRIM_AFTER: usize = 16 << 20;

/// Return free heap memory to the system now (blocking; a few ms on a large heap).
pub(crate) fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's free memory; it
    // takes the arena locks itself and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`trim`] on a blocking thread when `bytes` (a request's latents) were large.
pub(crate) fn trim_after(bytes: usize) {
    if bytes <= TRIM_AFTER {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(trim);
        }
        Err(_) => trim(),
    }
}

/// A response buffer that trims the heap once it has been sent and freed.
struct TrimOnDrop(Vec<u8>);

impl AsRef<[u8]> for TrimOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for TrimOnDrop {
    fn drop(&mut self) {
        let len = self.0.len();
        drop(std::mem::take(&mut self.0));
        trim_after(len);
    }
}

/// `buf` as a response body; when it is large, the heap is trimmed after it is freed.
pub(crate) fn body_bytes(buf: Vec<u8>) -> Bytes {
    if buf.len() > TRIM_AFTER {
        Bytes::from_owner(TrimOnDrop(buf))
    } else {
        Bytes::from(buf)
    }
}
