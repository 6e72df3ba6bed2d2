//! `rpc-server`: this machine's CPU as a llama.cpp RPC worker (ggml's
//! `ggml_backend_rpc_start_server`), for models spread over machines with
//! `--rpc`. The same build as the client, so the protocol always matches.

use clap::Args;

use latent_tap::rpc::{is_loopback, DEFAULT_PORT};
use latent_tap::{settings, Error, Result};

#[derive(Args)]
pub struct RpcServerArgs {
    /// Address to listen on. Loopback by default: ggml's RPC protocol has no
    /// authentication and no encryption, so anyone who reaches the port can
    /// use this machine's memory and CPU.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, short = 'p', default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Compute threads (default: all cores but one).
    #[arg(long, short = 't')]
    pub threads: Option<i32>,
    /// Listen on a non-loopback --host (required for one; read --host's warning).
    #[arg(long)]
    pub allow_remote: bool,
}

/// Serve until the process is stopped.
pub fn rpc_server(a: RpcServerArgs) -> Result<()> {
    if !is_loopback(&a.host) && !a.allow_remote {
        return Err(Error::invalid(format!(
            "--host {} is not a loopback address: ggml's RPC protocol has no authentication, so anyone who reaches the port can use this worker; pass --allow-remote on a trusted network only",
            a.host
        )));
    }
    if a.port == 0 {
        return Err(Error::invalid("--port must be 1..=65535"));
    }
    let threads = a.threads.unwrap_or_else(settings::spare_core_threads);
    settings::check_threads(threads)?;
    let endpoint = format!("{}:{}", a.host, a.port);
    latent_tap::engine::rpc::serve_worker(&endpoint, threads as usize, || {
        if !is_loopback(&a.host) {
            eprintln!(
                "latent-tap rpc-server: warning: listening on {} without authentication or encryption (ggml's RPC protocol has neither)",
                a.host
            );
        }
        eprintln!(
            "latent-tap rpc-server: serving this CPU on {endpoint} with {threads} threads (RPC protocol {}.{})",
            latent_tap::rpc::PROTO_MAJOR,
            latent_tap::rpc::PROTO_MINOR
        );
    })
}
