//! llama.cpp's RPC backend, the llama half: workers become devices a model's
//! layers are offloaded to (`--rpc`), and this process can serve as a worker
//! (`latent-tap rpc-server`). The endpoint checks and the handshake probe are
//! llama-free ([`crate::rpc`]).

use std::ffi::{c_char, CString};
use std::sync::Mutex;

use llama_cpp_sys_2 as sys;

use super::backend;
use crate::error::{Error, ErrorKind, Result};
use crate::rpc;

/// `ggml_backend_rpc_add_server` (reached through the RPC registry, so a build
/// without the RPC backend fails with a message instead of at link time).
type AddServerFn = unsafe extern "C" fn(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
/// `ggml_backend_rpc_start_server`.
type StartServerFn = unsafe extern "C" fn(
    endpoint: *const c_char,
    cache_dir: *const c_char,
    n_threads: usize,
    n_devices: usize,
    devices: *mut sys::ggml_backend_dev_t,
);

/// Workers registered in this process: endpoint and its registry. ggml keeps
/// one registry per endpoint; registering it twice would list its devices twice.
struct Registered(Vec<(String, sys::ggml_backend_reg_t)>);
// SAFETY: the registry pointers are process-lifetime ggml objects, only passed
// back to ggml's thread-safe registry functions.
unsafe impl Send for Registered {}

static WORKERS: Mutex<Registered> = Mutex::new(Registered(Vec::new()));

fn proc_address(name: &str) -> Result<*mut std::ffi::c_void> {
    backend::init();
    let reg_name = CString::new("RPC").expect("no NUL");
    let sym = CString::new(name).expect("no NUL");
    // SAFETY: NUL-terminated strings that outlive the calls; the registry
    // functions have no other preconditions.
    let p = unsafe {
        let reg = sys::ggml_backend_reg_by_name(reg_name.as_ptr());
        if reg.is_null() {
            std::ptr::null_mut()
        } else {
            sys::ggml_backend_reg_get_proc_address(reg, sym.as_ptr())
        }
    };
    if p.is_null() {
        return Err(Error::new(
            ErrorKind::ModelLoad,
            "this build of llama.cpp has no RPC backend (it is built with GGML_RPC=ON by the repository's .cargo/config.toml; a build with RUSTFLAGS or a system llama.cpp may lack it)",
        ));
    }
    Ok(p)
}

/// The devices a model loaded with `servers` (`--rpc`, already parsed) should
/// use, or `None` for llama.cpp's default (every device), which is what a
/// process that never used RPC gets. Each new worker is probed first
/// ([`rpc::probe`]: a clear error instead of ggml's abort or hang), then
/// registered once per process. With RPC in play the list is: this machine's
/// accelerators, then the named workers' devices (a model without `--rpc`
/// never lands on a worker another model of the process registered).
pub(crate) fn model_devices(servers: &[String]) -> Result<Option<Vec<sys::ggml_backend_dev_t>>> {
    let mut workers = WORKERS.lock().unwrap_or_else(|e| e.into_inner());
    if servers.is_empty() && workers.0.is_empty() {
        return Ok(None);
    }
    let mut regs = Vec::with_capacity(servers.len());
    for ep in servers {
        if let Some((_, r)) = workers.0.iter().find(|(e, _)| e == ep) {
            regs.push(*r);
            continue;
        }
        rpc::probe(ep, rpc::PROBE_TIMEOUT)?;
        let add = proc_address("ggml_backend_rpc_add_server")?;
        // SAFETY: the RPC registry's `ggml_backend_rpc_add_server`, whose type is
        // `AddServerFn` (ggml-rpc.h).
        let add: AddServerFn =
            unsafe { std::mem::transmute::<*mut std::ffi::c_void, AddServerFn>(add) };
        let c = CString::new(ep.as_str())
            .map_err(|_| Error::invalid("an RPC endpoint contains a NUL byte"))?;
        // SAFETY: a NUL-terminated endpoint the probe just reached; ggml copies it.
        let reg = unsafe { add(c.as_ptr()) };
        if reg.is_null() {
            return Err(Error::new(
                ErrorKind::ModelLoad,
                format!("RPC worker {ep} has no device to offer"),
            ));
        }
        // SAFETY: a registry ggml made for this endpoint, registered once (WORKERS).
        unsafe { sys::ggml_backend_register(reg) };
        workers.0.push((ep.clone(), reg));
        regs.push(reg);
    }
    let rpc_regs: Vec<_> = workers.0.iter().map(|(_, r)| *r).collect();
    let mut devices = Vec::new();
    // SAFETY: device enumeration of the registry; indices below the count.
    unsafe {
        for i in 0..sys::ggml_backend_dev_count() {
            let d = sys::ggml_backend_dev_get(i);
            let ty = sys::ggml_backend_dev_type(d);
            let local = !rpc_regs.contains(&sys::ggml_backend_dev_backend_reg(d));
            if local
                && (ty == sys::GGML_BACKEND_DEVICE_TYPE_GPU
                    || ty == sys::GGML_BACKEND_DEVICE_TYPE_IGPU)
            {
                devices.push(d);
            }
        }
        for r in regs {
            for i in 0..sys::ggml_backend_reg_dev_count(r) {
                devices.push(sys::ggml_backend_reg_dev_get(r, i));
            }
        }
    }
    Ok(Some(devices))
}

/// Serve this machine's CPU as an RPC worker on `endpoint` (`HOST:PORT`) with
/// `threads` threads, until the process ends; `ready` runs once the address is
/// known to be free. Returns only when ggml's server stops (it could not
/// listen, or its transport failed).
pub fn serve_worker(endpoint: &str, threads: usize, ready: impl FnOnce()) -> Result<()> {
    rpc::check_endpoint(endpoint)?;
    // ggml only prints "Failed to create server socket": find out why first.
    std::net::TcpListener::bind(endpoint)
        .map_err(|e| Error::new(ErrorKind::Io, format!("cannot listen on {endpoint}: {e}")))?;
    ready();
    let start = proc_address("ggml_backend_rpc_start_server")?;
    // SAFETY: the RPC registry's `ggml_backend_rpc_start_server`, of type
    // `StartServerFn` (ggml-rpc.h).
    let start: StartServerFn =
        unsafe { std::mem::transmute::<*mut std::ffi::c_void, StartServerFn>(start) };
    // SAFETY: device lookup in the registry (initialised by proc_address).
    let mut cpu = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
    if cpu.is_null() {
        return Err(Error::new(ErrorKind::Internal, "no CPU device to serve"));
    }
    let c =
        CString::new(endpoint).map_err(|_| Error::invalid("the endpoint contains a NUL byte"))?;
    // SAFETY: a NUL-terminated endpoint, no cache directory, one valid device;
    // the call serves clients until it fails.
    unsafe { start(c.as_ptr(), std::ptr::null(), threads.max(1), 1, &mut cpu) };
    Err(Error::new(
        ErrorKind::Io,
        format!("the RPC server on {endpoint} stopped (see ggml's message above)"),
    ))
}
