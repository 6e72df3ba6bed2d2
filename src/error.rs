//! One error type for the crate: a kind (stable, maps onto the C status enum)
//! plus a one-line message written for the person reading it.

use std::fmt;

/// What went wrong, coarse enough to branch on and to map to C status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// The crate's error: a kind plus a human-readable message.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Build an error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
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

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, e.to_string())
    }
}
