//! The listener's end of the transport: the sink socket, a host's hello with
//! its memfd (`SCM_RIGHTS`), and the shared-memory ring mapped from it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::wire::{Hello, MAX_HELLO, PROTOCOL};
use crate::error::{Error, ErrorKind, Result};
use crate::ring::{shm, Consumer};

/// The bound sink socket. Dropping it removes the socket file (when it is
/// still the one it bound).
#[derive(Debug)]
pub struct Sink {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

fn io_err(what: String, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("{what}: {e}"))
}

impl Sink {
    /// Bind a Unix stream socket at `path`. A socket file left by a listener
    /// that is gone is replaced; a live listener's socket, or a path that is
    /// not a socket, is refused. The socket file has `mode` (0600: only this
    /// user may connect) whatever the umask.
    pub fn bind(path: &Path, mode: u32) -> Result<Self> {
        let show = path.display();
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(Error::invalid(format!(
                        "another listener is bound to {show}"
                    )));
                }
                std::fs::remove_file(path)
                    .map_err(|e| io_err(format!("removing the stale socket {show}"), e))?;
            }
            Ok(_) => {
                return Err(Error::invalid(format!(
                    "{show} exists and is not a socket; refusing to replace it"
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("inspecting {show}"), e)),
        }
        let listener = bind_private(path, mode)?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err(format!("setting up {show}"), e))?;
        let ino = std::os::unix::fs::MetadataExt::ino(
            &std::fs::symlink_metadata(path)
                .map_err(|e| io_err(format!("inspecting {show}"), e))?,
        );
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            ino,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A host that connected, if any (never blocks).
    pub fn accept(&self) -> Result<Option<UnixStream>> {
        match self.listener.accept() {
            Ok((s, _)) => Ok(Some(s)),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted
                    || e.kind() == std::io::ErrorKind::ConnectionAborted =>
            {
                Ok(None)
            }
            Err(e) => Err(io_err(format!("accepting on {}", self.path.display()), e)),
        }
    }
}

/// Binds `path` with permissions `mode` from the start: bound in a fresh
/// 0700 directory beside it (nobody else can reach the socket there), given
/// its mode, then renamed into place.
fn bind_private(path: &Path, mode: u32) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let show = path.display();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = parent.join(format!(
        ".lt{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
    let tmp = dir.join("s");
    let r = (|| {
        let l = UnixListener::bind(&tmp).map_err(|e| io_err(format!("binding {show}"), e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_err(format!("setting the mode of {show}"), e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(format!("binding {show}"), e))?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    r
}

/// Process id and user id of the process at the other end of `s`
/// (`SO_PEERCRED`: as it was when it connected).
pub fn peer_cred(s: &UnixStream) -> Result<(u32, u32)> {
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` and `len` are valid out-parameters of the size given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(c) as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io_err(
            "reading the host's credentials".into(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok((c.pid as u32, c.uid))
}

impl Drop for Sink {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A host that said hello: its hello, its ring, and its socket (kept open to
/// notice when it exits).
#[derive(Debug)]
pub struct Attached {
    /// What the host said.
    pub hello: Hello,
    /// The consuming half of the host's ring.
    pub consumer: Consumer,
    /// The connection.
    pub stream: UnixStream,
}

/// Receive a host's hello and memfd from `stream` (waiting at most
/// `timeout`), map the memfd and attach to its ring. Every error says why the
/// host is refused; the connection is dropped with it.
pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Attached> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .map_err(|e| io_err("setting up the connection".into(), e))?;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(MAX_HELLO + 1);
    let mut fds: Vec<OwnedFd> = Vec::new();
    let hello: Hello = loop {
        if Instant::now() > deadline {
            return Err(Error::invalid("no complete hello in time"));
        }
        let got = recv_with_fds(stream.as_raw_fd(), MAX_HELLO + 1 - buf.len(), &mut fds)?;
        if got.is_empty() {
            return Err(Error::invalid(if buf.is_empty() {
                "the host hung up without a hello".to_string()
            } else {
                format!(
                    "the host hung up after {} bytes of an incomplete hello",
                    buf.len()
                )
            }));
        }
        buf.extend_from_slice(&got);
        if buf.len() > MAX_HELLO {
            return Err(Error::invalid(format!(
                "the hello is longer than {MAX_HELLO} bytes"
            )));
        }
        match serde_json::from_slice::<Hello>(&buf) {
            Ok(h) => break h,
            Err(e) if e.is_eof() => continue,
            Err(e) => {
                // Name the format first when the host speaks another one.
                if let Some(f) = serde_json::from_slice::<serde_json::Value>(&buf)
                    .ok()
                    .and_then(|v| v.get("format")?.as_str().map(str::to_string))
                    .filter(|f| f != PROTOCOL)
                {
                    return Err(Error::invalid(format!(
                        "the host speaks '{f}', not '{PROTOCOL}'"
                    )));
                }
                return Err(Error::invalid(format!("the hello is not valid: {e}")));
            }
        }
    };
    if hello.format != PROTOCOL {
        return Err(Error::invalid(format!(
            "the host speaks '{}', not '{PROTOCOL}'",
            hello.format
        )));
    }
    if fds.len() != 1 {
        return Err(Error::invalid(format!(
            "the hello came with {} file descriptors, not the ring's one",
            fds.len()
        )));
    }
    let fd = fds.pop().expect("one fd");
    let consumer = map_ring(&fd, hello.map_bytes)?;
    drop(fd); // the mapping keeps the memory
    stream
        .set_nonblocking(true)
        .map_err(|e| io_err("setting up the connection".into(), e))?;
    Ok(Attached {
        hello,
        consumer,
        stream,
    })
}

/// One `recvmsg` of at most `max` bytes; descriptors that came with it are
/// appended to `fds`. Empty: end of stream.
fn recv_with_fds(sock: RawFd, max: usize, fds: &mut Vec<OwnedFd>) -> Result<Vec<u8>> {
    let mut data = vec![0u8; max.max(1)];
    // Room for a few descriptors, 8-byte aligned as cmsghdr needs.
    // SAFETY: CMSG_SPACE only computes a size.
    let space =
        unsafe { libc::CMSG_SPACE((4 * std::mem::size_of::<libc::c_int>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg points at live buffers of the lengths it states.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                return Err(Error::invalid("no complete hello in time"))
            }
            _ => return Err(io_err("reading the hello".into(), e)),
        }
    };
    // SAFETY: the kernel filled `msg`'s control buffer; the CMSG_* macros walk
    // it within msg_controllen, and each SCM_RIGHTS entry holds whole c_ints
    // that are descriptors now owned by this process.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<libc::c_int>();
                for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(Error::invalid(
            "the hello came with more file descriptors than expected",
        ));
    }
    data.truncate(n);
    Ok(data)
}

unsafe fn munmap_release(base: *mut u8, len: usize) {
    // SAFETY: (caller) `base..base + len` is a mapping made by `map_ring`,
    // released once.
    unsafe {
        libc::munmap(base.cast(), len);
    }
}

/// Map the memfd (`len` bytes, which must be its size) and attach to the ring in it.
fn map_ring(fd: &OwnedFd, len: u64) -> Result<Consumer> {
    // SAFETY: an all-zero stat is valid storage for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is writable.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io_err(
            "inspecting the ring's memfd".into(),
            std::io::Error::last_os_error(),
        ));
    }
    if st.st_size as u64 != len {
        return Err(Error::invalid(format!(
            "the hello says the ring takes {len} bytes but its memfd holds {}",
            st.st_size
        )));
    }
    let n = usize::try_from(len)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::invalid(format!("a ring of {len} bytes cannot be mapped")))?;
    // SAFETY: a fresh shared mapping of the whole memfd; nothing else in this
    // process aliases it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io_err(
            format!("mapping the ring's {n} bytes"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: base..base+n is a readable and writable mapping that only the
    // consumer will access; munmap_release unmaps it once, when it is dropped.
    match unsafe { shm::consumer(base.cast(), n, munmap_release) } {
        Ok(c) => Ok(c),
        Err(e) => {
            // SAFETY: the consumer was not built, so the mapping is still ours.
            unsafe { munmap_release(base.cast(), n) };
            Err(Error::invalid(format!("{e}")))
        }
    }
}

/// Whether the host closed its end (exited), without blocking.
pub fn hung_up(stream: &UnixStream) -> bool {
    let mut b = [0u8; 64];
    // SAFETY: b is a writable buffer of the stated length.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            b.as_mut_ptr().cast(),
            b.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n == 0 {
        return true;
    }
    if n > 0 {
        return false; // stray bytes: the protocol has none, ignore them
    }
    !matches!(
        std::io::Error::last_os_error().kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}
