//! `listen`: receive the latents of programs tapped with the LD_PRELOAD library.

use std::path::PathBuf;

use clap::Args;

use latent_tap::settings;
use latent_tap::{Error, Result};

use crate::outdir::make_out_dir;
use crate::signals::{on_signals, STOP};
use crate::stdout::to_stdout;

#[derive(Args)]
pub struct ListenArgs {
    /// Unix socket the tapped hosts connect to (their LATENT_TAP_SINK).
    #[arg(long, default_value = "/tmp/latent-tap.sock")]
    sink: PathBuf,
    /// Write every request into this run directory (the layout of `capture --prompts`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Close a shard of --out at this many MB of latents (default 64).
    #[arg(long)]
    shard_mb: Option<f64>,
    /// Offer GET /latents/subscribe and GET /health to observers over HTTP.
    #[arg(long)]
    serve: bool,
    /// Port of --serve (0: any free port; the chosen one is printed).
    #[arg(long)]
    port: Option<u16>,
    /// Address of --serve (loopback only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// MB of records an observer may have queued before its frames are dropped.
    #[arg(long, default_value_t = 64)]
    subscriber_queue_mb: usize,
    /// Seconds between progress lines on stderr.
    #[arg(long, default_value_t = 5.0)]
    progress_secs: f64,
    /// No progress or attach lines (refusals and errors are still printed).
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Also accept hosts running as this user id (repeatable). Without it the
    /// socket is readable and writable by this user only and other users'
    /// hosts are refused; with it the socket is open to all users and each
    /// host's user (SO_PEERCRED) is checked.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uid: Vec<u32>,
}

/// `listen`: receive tapped hosts until SIGINT/SIGTERM, then finish the run.
pub fn listen(a: ListenArgs) -> Result<()> {
    use latent_tap::attach::listen::{self, ListenOptions, ServeAt};
    if a.out.is_none() && !a.serve {
        return Err(Error::invalid(
            "listen needs somewhere to put what it receives: --out DIR and/or --serve --port P",
        ));
    }
    let serve = match (a.serve, a.port) {
        (true, Some(port)) => {
            #[cfg(feature = "serve")]
            // listen has no API key: loopback only.
            latent_tap::server::check_exposure(&a.host, None).map_err(|_| {
                Error::invalid(format!(
                    "--host: {} is not a loopback address; listen serves observers on \
                     127.0.0.1, ::1 or localhost only",
                    a.host
                ))
            })?;
            Some(ServeAt {
                host: a.host.clone(),
                port,
            })
        }
        (true, None) => return Err(Error::invalid("--serve needs --port (0: any free port)")),
        (false, Some(_)) => return Err(Error::invalid("--port needs --serve")),
        (false, None) => None,
    };
    if a.subscriber_queue_mb == 0 {
        return Err(Error::invalid("--subscriber-queue-mb must be positive"));
    }
    if !(a.progress_secs.is_finite() && a.progress_secs > 0.0 && a.progress_secs <= 86400.0) {
        return Err(Error::invalid(format!(
            "--progress-secs must be between 0 and 86400, not {}",
            a.progress_secs
        )));
    }
    let shard_bytes = match a.shard_mb {
        Some(mb) => settings::shard_bytes_from_mb(mb)
            .map_err(|e| Error::invalid(format!("--shard-mb: {}", e.message())))?,
        None => settings::DEFAULT_SHARD_BYTES,
    };
    if let Some(dir) = &a.out {
        let show = dir.display();
        make_out_dir(dir)?;
        if latent_tap::dataset::holds_run(dir) {
            return Err(Error::invalid(format!(
                "'{show}' already holds a run; use a new directory"
            )));
        }
    }
    on_signals()?;
    let opts = ListenOptions {
        sink: a.sink.clone(),
        out: a.out.clone(),
        shard_bytes,
        serve,
        subscriber_queue: crate::args::mib("--subscriber-queue-mb", a.subscriber_queue_mb)?,
        progress: (!a.quiet).then(|| std::time::Duration::from_secs_f64(a.progress_secs)),
        verbose: !a.quiet,
        hello_timeout: std::time::Duration::from_secs(5),
        allow_uids: a.allow_uid.clone(),
    };
    let log: listen::Log = std::sync::Arc::new(|line: &str| eprintln!("{line}"));
    let out = listen::run(&opts, &STOP, log, &mut |addr| {
        let _ = to_stdout(|w| writeln!(w, "latent-tap listen: serving observers on http://{addr}"));
    })?;
    let st = &out.stats;
    to_stdout(|w| {
        writeln!(
            w,
            "latent-tap listen: {} host connections ({} refused), {} frames, {} rows, {} requests ({} written, {} shards), {} drops",
            st.hosts.len(),
            st.refused,
            st.frames(),
            st.rows(),
            st.requests(),
            st.committed,
            out.shards,
            st.drops()
        )
    })
}
