//! The connection to a listener: a Unix socket for the hello and for noticing
//! that the listener left, and a ring in a `memfd` both processes map.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::config::Config;
use crate::ring::{self, Producer};
use crate::wire::{Hello, MAX_HELLO, PROTOCOL};

/// An attached listener.
#[derive(Debug)]
pub struct Link {
    sock: OwnedFd,
    /// Frames go here.
    pub producer: Producer,
    /// Connection number (1 for the first listener).
    pub connection: u32,
}

/// `release` for a ring in a mapping made by [`Link::connect`].
unsafe fn unmap(base: *mut u8, len: usize) {
    // SAFETY: `base..base+len` is the mapping `Link::connect` created and
    // handed to the ring, which calls this once when it is dropped.
    unsafe { libc::munmap(base as *mut c_void, len) };
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Why [`Link::connect`] did not attach.
#[derive(Debug)]
pub enum ConnectError {
    /// The socket file or the listener belongs to another user the host's
    /// environment does not allow: the tap stays off.
    Refused(String),
    /// A listener is there but the ring could not be set up (worth a log line).
    Failed(String),
}

impl From<String> for ConnectError {
    fn from(s: String) -> Self {
        Self::Failed(s)
    }
}

impl From<&str> for ConnectError {
    fn from(s: &str) -> Self {
        Self::Failed(s.into())
    }
}

/// `Err` unless `uid` is this process's user or one `cfg` allows.
fn check_uid(cfg: &Config, what: &str, uid: u32) -> Result<(), ConnectError> {
    // SAFETY: plain getter.
    let me = unsafe { libc::geteuid() };
    if uid == me || cfg.allow_uids.contains(&uid) {
        return Ok(());
    }
    Err(ConnectError::Refused(format!(
        "{what} {} belongs to uid {uid}, not to this program's uid {me} \
         (LATENT_TAP_ALLOW_UID={uid} allows it)",
        cfg.sink
    )))
}

impl Link {
    /// Connect to the listener at `cfg.sink` if one is there and it is this
    /// user's (or an allowed user's). `Ok(None)`: no listener (nothing to
    /// report).
    pub fn connect(cfg: &Config, connection: u32) -> Result<Option<Self>, ConnectError> {
        let Ok(cpath) = std::ffi::CString::new(cfg.sink.as_bytes()) else {
            return Err("sink path holds a NUL byte".into());
        };
        // SAFETY: all-zero is a valid stat buffer.
        let mut sb: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: NUL-terminated path; `sb` is a valid out-parameter.
        if unsafe { libc::stat(cpath.as_ptr(), &mut sb) } != 0 {
            // No socket there (yet).
            return Ok(None);
        }
        check_uid(cfg, "the socket", sb.st_uid)?;
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(format!("socket: {}", errno()).into());
        }
        // SAFETY: `fd` is a new descriptor owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_un.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let path = cfg.sink.as_bytes();
        if path.len() >= addr.sun_path.len() {
            return Err("sink path too long".into());
        }
        for (d, &s) in addr.sun_path.iter_mut().zip(path) {
            *d = s as libc::c_char;
        }
        // SAFETY: `addr` is a valid sockaddr_un of the given size.
        let r = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                std::ptr::addr_of!(addr) as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r != 0 {
            // No listener (ENOENT, ECONNREFUSED) or its backlog is full (EAGAIN).
            return Ok(None);
        }
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut clen = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `clen` are valid out-parameters of the size given.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                std::ptr::addr_of_mut!(cred) as *mut c_void,
                &mut clen,
            )
        };
        if r != 0 {
            return Err(format!("reading the listener's credentials: {}", errno()).into());
        }
        check_uid(cfg, "the listener at", cred.uid)?;
        let len = ring::shm::mapping_len(cfg.ring_bytes).ok_or("ring too large")?;
        // SAFETY: NUL-terminated name; flags are valid.
        let mfd = unsafe { libc::memfd_create(c"latent-tap-ring".as_ptr(), libc::MFD_CLOEXEC) };
        if mfd < 0 {
            return Err(format!("memfd_create: {}", errno()).into());
        }
        // SAFETY: new descriptor owned by nobody else.
        let mfd = unsafe { OwnedFd::from_raw_fd(mfd) };
        // SAFETY: plain ftruncate on our memfd.
        if unsafe { libc::ftruncate(mfd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(format!("sizing the ring ({len} bytes): {}", errno()).into());
        }
        // SAFETY: a fresh shared mapping of the whole memfd.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mfd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!("mapping the ring: {}", errno()).into());
        }
        // SAFETY: the mapping is new, zero-filled (fresh memfd), page-aligned,
        // readable and writable; only this producer touches it in this
        // process, and `unmap` releases exactly it.
        let producer = match unsafe { ring::shm::producer(base as *mut u8, len, unmap) } {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: the mapping made above, not handed to anyone.
                unsafe { libc::munmap(base, len) };
                return Err(e.to_string().into());
            }
        };
        let hello = Hello {
            format: PROTOCOL.into(),
            pid: std::process::id(),
            exe: std::fs::read_link("/proc/self/exe")
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            map_bytes: len as u64,
            tensors: cfg.tensors.clone(),
            layers: cfg.layers_text.clone(),
            rows: if cfg.last_only { "last" } else { "all" }.into(),
            dtype: cfg.dtype.name().into(),
            connection,
        };
        let msg = serde_json::to_vec(&hello).map_err(|e| e.to_string())?;
        if msg.len() > MAX_HELLO {
            return Err("hello too long".into());
        }
        send_with_fd(sock.as_raw_fd(), &msg, mfd.as_raw_fd())
            .map_err(|e| format!("sending the ring to the listener: {e}"))?;
        // The listener holds its own descriptor now; ours closes here.
        drop(mfd);
        Ok(Some(Self {
            sock,
            producer,
            connection,
        }))
    }

    /// Whether the listener is still connected (its end not closed).
    pub fn alive(&self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: peek at most one byte into `b`, without blocking.
        let r = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                b.as_mut_ptr() as *mut c_void,
                1,
                libc::MSG_DONTWAIT | libc::MSG_PEEK,
            )
        };
        if r == 0 {
            return false;
        }
        if r < 0 {
            let e = std::io::Error::last_os_error().raw_os_error();
            return e == Some(libc::EAGAIN)
                || e == Some(libc::EWOULDBLOCK)
                || e == Some(libc::EINTR);
        }
        true
    }
}

/// `sendmsg` of `data` with `fd` attached (`SCM_RIGHTS`), never raising SIGPIPE.
fn send_with_fd(sock: i32, data: &[u8], fd: i32) -> std::io::Result<()> {
    // Room for one cmsg carrying one int, 8-aligned.
    let mut cbuf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut c_void,
        iov_len: data.len(),
    };
    // SAFETY: all-zero is a valid msghdr; fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut c_void;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    assert!(space <= std::mem::size_of_val(&cbuf));
    msg.msg_controllen = space as _;
    // SAFETY: `msg` has a control buffer of `space` bytes, enough for one
    // header and one int; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, fd);
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != data.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "hello was cut short",
        ));
    }
    Ok(())
}
