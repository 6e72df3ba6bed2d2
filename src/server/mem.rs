//! Giving memory back after a large request. glibc's malloc keeps memory a
//! request freed in its arenas (the router thread allocates the frames, the HTTP
//! threads free them), so a server that answered one large request would keep its
//! peak RSS while idle. After a request that held more than [`TRIM_AFTER`] bytes of
//! latents the server calls `malloc_trim(0)`, which hands every arena's free pages
//! back to the system (docs/PROTOCOL.md, "Memory").

use axum::body::Bytes;

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
