//! One error type for the crate: a kind (stable, maps onto the C status enum)
//! plus a one-line message written for the person reading it.

use std::fmt;
use std::sync::Arc;

/// What went wrong, coarse enough to branch on and to map to C status codes
/// (one `lt_status` per kind). New kinds may be added: match with a wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An argument or option is out of range or inconsistent.
    InvalidArgument,
    /// The model file is missing, unreadable, truncated or not GGUF.
    ModelLoad,
    /// A capture pattern matched no tensor in the model's graph.
    NoMatch,
    /// The prompt does not fit in the context.
    PromptTooLong,
    /// llama.cpp failed to decode a batch.
    Decode,
    /// A lossless ring stayed full past its timeout (the consumer is too slow).
    RingTimeout,
    /// A single frame is larger than the ring can ever hold.
    FrameTooLarge,
    /// Reading or writing a file failed.
    Io,
    /// A bug in latent-tap (an invariant did not hold).
    Internal,
}

impl ErrorKind {
    /// Every kind, so that mappings (the C status enum) can be checked to be
    /// one-to-one.
    pub const ALL: &'static [ErrorKind] = &[
        ErrorKind::InvalidArgument,
        ErrorKind::ModelLoad,
        ErrorKind::NoMatch,
        ErrorKind::PromptTooLong,
        ErrorKind::Decode,
        ErrorKind::RingTimeout,
        ErrorKind::FrameTooLarge,
        ErrorKind::Io,
        ErrorKind::Internal,
    ];
}

/// The crate's error: a kind plus a human-readable message, and the error
/// that caused it where there is one ([`std::error::Error::source`]).
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Build an error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Build an error of `kind` with `message`, caused by `source` (kept, and
    /// returned by [`std::error::Error::source`]).
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// An [`ErrorKind::Io`] error: `what` (e.g. "reading") failed on `path`.
    pub fn io(path: &std::path::Path, what: &str, e: std::io::Error) -> Self {
        Self::with_source(ErrorKind::Io, format!("{what} {}: {e}", path.display()), e)
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::with_source(ErrorKind::Io, e.to_string(), e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    /// `ErrorKind::ALL` must hold every kind: the C mapping's one-to-one check
    /// (`every_error_kind_has_its_own_status` in the main crate) walks it. The
    /// match below is exhaustive, so a new kind does not compile here until it
    /// gets a number; the assertion then fails until it is in `ALL` too.
    #[test]
    fn all_holds_every_kind_once() {
        let number = |k: ErrorKind| match k {
            ErrorKind::InvalidArgument => 0,
            ErrorKind::ModelLoad => 1,
            ErrorKind::NoMatch => 2,
            ErrorKind::PromptTooLong => 3,
            ErrorKind::Decode => 4,
            ErrorKind::RingTimeout => 5,
            ErrorKind::FrameTooLarge => 6,
            ErrorKind::Io => 7,
            ErrorKind::Internal => 8,
        };
        let mut seen: Vec<usize> = ErrorKind::ALL.iter().map(|&k| number(k)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..9).collect::<Vec<_>>());
    }

    #[test]
    fn io_errors_keep_their_cause() {
        let e = Error::io(
            std::path::Path::new("/nonexistent/x"),
            "reading",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.message().starts_with("reading /nonexistent/x: "), "{e}");
        let cause = e.source().expect("the io::Error is kept");
        let io = cause.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert!(Error::invalid("x").source().is_none());
        let copy = e.clone();
        assert!(copy.source().is_some());
    }
}
