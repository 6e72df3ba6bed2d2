//! SIGINT / SIGTERM: a dataset capture or `listen` stops after the work in
//! flight and finishes its run.

use latent_tap::Result;
#[cfg(unix)]
use latent_tap::{Error, ErrorKind};

/// The signal that stopped a dataset capture (0: none).
pub static SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Set by SIGINT / SIGTERM: the capture stops after the decode in flight.
pub static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

#[cfg(unix)]
pub fn on_signals() -> Result<()> {
    for sig in [SIGINT, SIGTERM] {
        // SAFETY: the action only stores into two atomics, which is
        // async-signal-safe (no allocation, no lock, no I/O).
        unsafe {
            signal_hook_registry::register(sig, move || {
                SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
                STOP.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        }
        .map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("installing a signal handler: {e}"),
            )
        })?;
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn on_signals() -> Result<()> {
    Ok(())
}
