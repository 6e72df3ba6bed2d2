//! Writing results to standard output.

use std::io::Write;

use latent_tap::{Error, ErrorKind, Result};

/// Run `f` on a locked stdout and flush. A closed pipe (`| head`) ends the
/// output quietly; any other failure (a full disk) is an error.
pub fn to_stdout(f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match f(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::new(ErrorKind::Io, format!("writing to stdout: {e}"))),
    }
}
