//! llama.cpp's RPC backend (`ggml-rpc`), the llama-free half: worker
//! endpoints (`HOST:PORT`, llama-server's `--rpc` spelling) and a probe that
//! checks a worker before ggml connects to it.
//!
//! Why a probe: the vendored ggml aborts the whole process when it cannot
//! connect to a worker, when the handshake fails or when the worker speaks
//! another protocol version, and it waits without a time-out on a worker that
//! is busy (a worker serves one client at a time). [`probe`] does the same
//! HELLO handshake first, with a time-out, so each of these is one clear error
//! instead of an abort or a hang. A worker that dies *after* the model is
//! loaded still aborts the process inside ggml (see README, "Models larger
//! than one machine").

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// The RPC protocol version of the vendored ggml (`RPC_PROTO_MAJOR_VERSION`
/// and `RPC_PROTO_MINOR_VERSION` in `ggml-rpc.h` of llama-cpp-sys-2 0.1.161,
/// pinned in Cargo.toml): a worker must have this major version and at most
/// this minor version.
pub const PROTO_MAJOR: u8 = 7;
/// See [`PROTO_MAJOR`].
pub const PROTO_MINOR: u8 = 0;
/// `RPC_CMD_HELLO` (fixed at 14 by ggml).
const CMD_HELLO: u8 = 14;
/// `RPC_CONN_CAPS_SIZE`: the capability bytes of a HELLO (all zero: plain TCP).
const CONN_CAPS: usize = 24;
/// At most this many workers (`GGML_RPC_MAX_SERVERS`).
pub const MAX_SERVERS: usize = 16;
/// The port `latent-tap rpc-server` and ggml's `rpc-server` listen on by default.
pub const DEFAULT_PORT: u16 = 50052;
/// How long [`probe`] waits to connect and for the handshake's answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Parse a comma-separated list of `HOST:PORT` worker endpoints (the value of
/// `--rpc`): each host a name, an IPv4 address or a bracketed IPv6 address,
/// each port 1..=65535; at most [`MAX_SERVERS`], no duplicates.
pub fn parse_servers(list: &str) -> Result<Vec<String>> {
    let items: Vec<&str> = list.split(',').map(str::trim).collect();
    if items.iter().all(|s| s.is_empty()) {
        return Err(Error::invalid(
            "--rpc needs HOST:PORT[,HOST:PORT...] (e.g. 127.0.0.1:50052)",
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for s in items {
        check_endpoint(s)?;
        if out.iter().any(|o| o == s) {
            return Err(Error::invalid(format!("--rpc names worker {s} twice")));
        }
        out.push(s.to_string());
    }
    if out.len() > MAX_SERVERS {
        return Err(Error::invalid(format!(
            "--rpc names {} workers; llama.cpp takes at most {MAX_SERVERS}",
            out.len()
        )));
    }
    Ok(out)
}

/// Check one `HOST:PORT` endpoint's form (no network), as ggml parses it: the
/// host is everything before the first `:` (so no IPv6 literal), the port a
/// number 1..=65535.
pub fn check_endpoint(s: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::invalid(format!(
            "RPC worker '{s}' {why}: give HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}"
        ))
    };
    let (host, port) = s.split_once(':').ok_or_else(|| bad("has no port"))?;
    if host.starts_with('[') || port.contains(':') {
        return Err(bad(
            "is an IPv6 address, which ggml's RPC client cannot parse (use a host name or IPv4)",
        ));
    }
    let port: u16 = port.parse().map_err(|_| bad("has no valid port"))?;
    if port == 0 {
        return Err(bad("has port 0"));
    }
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad("has no valid host"));
    }
    Ok(())
}

/// Whether `host` (as given to `rpc-server --host`) is a loopback address.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Connect to worker `endpoint` and do ggml's HELLO handshake: the worker must
/// answer within `timeout` with a protocol version this build speaks. The
/// connection is closed again (the worker then serves its next client).
pub fn probe(endpoint: &str, timeout: Duration) -> Result<()> {
    check_endpoint(endpoint)?;
    let fail = |why: String| {
        Error::new(
            ErrorKind::ModelLoad,
            format!("RPC worker {endpoint}: {why}"),
        )
    };
    let addrs: Vec<SocketAddr> = endpoint
        .to_socket_addrs()
        .map_err(|e| fail(format!("cannot resolve it: {e}")))?
        .collect();
    let mut last = None;
    let mut sock = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut sock = sock.ok_or_else(|| {
        fail(format!(
            "cannot connect ({}); is `latent-tap rpc-server` (or llama.cpp's rpc-server) running there?",
            last.map_or_else(|| "no address".to_string(), |e| e.to_string())
        ))
    })?;
    sock.set_read_timeout(Some(timeout)).ok();
    sock.set_write_timeout(Some(timeout)).ok();
    let mut req = Vec::with_capacity(1 + 8 + CONN_CAPS);
    req.push(CMD_HELLO);
    req.extend_from_slice(&(CONN_CAPS as u64).to_le_bytes());
    req.extend_from_slice(&[0u8; CONN_CAPS]);
    sock.write_all(&req)
        .map_err(|e| fail(format!("cannot send the handshake: {e}")))?;
    let mut size = [0u8; 8];
    sock.read_exact(&mut size).map_err(|e| {
        fail(if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            format!(
                "no handshake answer within {} s (a worker serves one client at a time: is another one connected?)",
                timeout.as_secs()
            )
        } else {
            format!("it closed the connection during the handshake ({e}): a worker of another RPC protocol version?")
        })
    })?;
    let size = u64::from_le_bytes(size);
    if size != 4 + CONN_CAPS as u64 {
        return Err(fail(format!(
            "its handshake answer has {size} bytes, not {}: a worker of another RPC protocol version",
            4 + CONN_CAPS
        )));
    }
    let mut rsp = [0u8; 4 + CONN_CAPS];
    sock.read_exact(&mut rsp)
        .map_err(|e| fail(format!("the handshake answer was cut short: {e}")))?;
    let (major, minor, patch) = (rsp[0], rsp[1], rsp[2]);
    if major != PROTO_MAJOR || minor > PROTO_MINOR {
        return Err(fail(format!(
            "it speaks RPC protocol {major}.{minor}.{patch}, this build {PROTO_MAJOR}.{PROTO_MINOR}.x: use workers built from the same llama.cpp (latent-tap rpc-server of this build)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(
            parse_servers("127.0.0.1:50052, localhost:1").unwrap(),
            ["127.0.0.1:50052", "localhost:1"]
        );
        for bad in [
            "",
            " , ",
            "127.0.0.1",
            "host:",
            "host:0",
            "host:70000",
            ":50052",
            "::1:5",
            "[::1]:5",
            "a b:1",
        ] {
            let e = parse_servers(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
        }
        assert!(parse_servers("a:1,a:1")
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let many: Vec<String> = (1..=17).map(|p| format!("h:{p}")).collect();
        assert!(parse_servers(&many.join(","))
            .unwrap_err()
            .to_string()
            .contains("at most 16"));
        assert!(is_loopback("127.0.0.1") && is_loopback("localhost") && is_loopback("[::1]"));
        assert!(!is_loopback("0.0.0.0") && !is_loopback("10.0.0.1"));
    }

    fn serve_once(answer: Vec<u8>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 1 + 8 + CONN_CAPS];
            s.read_exact(&mut req).unwrap();
            assert_eq!(req[0], CMD_HELLO);
            assert_eq!(
                u64::from_le_bytes(req[1..9].try_into().unwrap()),
                CONN_CAPS as u64
            );
            s.write_all(&answer).unwrap();
        });
        addr
    }

    fn hello(major: u8, minor: u8) -> Vec<u8> {
        let mut a = (4 + CONN_CAPS as u64).to_le_bytes().to_vec();
        a.extend_from_slice(&[major, minor, 0, 0]);
        a.extend_from_slice(&[0; CONN_CAPS]);
        a
    }

    #[test]
    fn probe_accepts_this_version_and_refuses_others() {
        probe(&serve_once(hello(PROTO_MAJOR, PROTO_MINOR)), PROBE_TIMEOUT).unwrap();
        let e = probe(&serve_once(hello(PROTO_MAJOR + 1, 0)), PROBE_TIMEOUT).unwrap_err();
        assert!(e.to_string().contains("speaks RPC protocol 8.0.0"), "{e}");
        let e = probe(&serve_once(vec![1, 0, 0, 0, 0, 0, 0, 0, 9]), PROBE_TIMEOUT).unwrap_err();
        assert!(e.to_string().contains("has 1 bytes"), "{e}");
    }

    #[test]
    fn probe_names_a_closed_port_and_a_silent_worker() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = probe(&format!("127.0.0.1:{port}"), PROBE_TIMEOUT).unwrap_err();
        assert!(e.to_string().contains("cannot connect"), "{e}");
        // Accepts but never answers (a worker busy with another client).
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t0 = std::time::Instant::now();
        let e = probe(&addr, Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("no handshake answer"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3));
        drop(l);
    }
}
