//! The crate's error types: [`CommError`] for failed collectives, [`Error`] for everything.

use std::time::Duration;

use crate::comm::Op;

/// Why a collective operation failed. Every variant names the operation and the rank that
/// reports it, so the message of each rank says what it was doing.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// Some ranks did not reach the operation within the timeout.
    #[error("{op} on rank {rank} timed out after {timeout:?}: ranks {missing:?} never arrived")]
    Timeout {
        /// The operation.
        op: Op,
        /// The rank reporting it.
        rank: usize,
        /// The group's timeout.
        timeout: Duration,
        /// The ranks that had not arrived.
        missing: Vec<usize>,
    },

    /// A peer left the group (its thread or process failed, or it finished) before joining.
    #[error("{op} on rank {rank} failed: rank {peer} left the group before joining it")]
    PeerLeft {
        /// The operation.
        op: Op,
        /// The rank reporting it.
        rank: usize,
        /// The rank that left.
        peer: usize,
    },

    /// Two ranks called different operations, or the same one with different lengths, at the
    /// same point of their sequence of collectives.
    #[error("{op} of {len} elements on rank {rank} met {peer_op} of {peer_len} elements from rank {peer}")]
    Mismatch {
        /// This rank's operation.
        op: Op,
        /// The rank reporting it.
        rank: usize,
        /// Its length.
        len: usize,
        /// The peer.
        peer: usize,
        /// The peer's operation.
        peer_op: Op,
        /// The peer's length.
        peer_len: usize,
    },

    /// The group failed earlier (on this or another rank); every later operation fails too.
    #[error("{op} on rank {rank} aborted: the group failed earlier ({cause})")]
    Aborted {
        /// The operation.
        op: Op,
        /// The rank reporting it.
        rank: usize,
        /// The first failure.
        cause: Box<CommError>,
    },

    /// A buffer whose length is not a multiple of the world size where it must be.
    #[error("{op} on rank {rank}: a buffer of {len} elements cannot be split over {world_size} ranks")]
    BadLength {
        /// The operation.
        op: Op,
        /// The rank reporting it.
        rank: usize,
        /// The buffer's length.
        len: usize,
        /// The world size.
        world_size: usize,
    },

    /// The backend (NCCL, CUDA) reported a failure of its own.
    #[error("{op} on rank {rank} failed in the backend: {message}")]
    Backend {
        /// The operation.
        op: Op,
        /// The rank reporting it.
        rank: usize,
        /// The backend's message.
        message: String,
    },

    /// A broadcast root that is not a rank.
    #[error("{op} on rank {rank}: root {root} is not below the world size {world_size}")]
    BadRoot {
        /// The operation.
        op: Op,
        /// The rank reporting it.
        rank: usize,
        /// The root asked for.
        root: usize,
        /// The world size.
        world_size: usize,
    },
}

/// Everything that can go wrong in candle-shard.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from Candle.
    #[error(transparent)]
    Candle(#[from] candle::Error),

    /// An error from candle-train (configs, data, the model, the optimizer).
    #[error(transparent)]
    Train(#[from] candle_train::Error),

    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] CommError),

    /// A setting is out of range.
    #[error("invalid `{field}`: {reason}")]
    InvalidConfig {
        /// The field, as the user spells it.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A launcher variable is missing where another one implies it.
    #[error("environment variable `{name}` is not set (needed with `{because}`)")]
    MissingEnv {
        /// The missing variable.
        name: &'static str,
        /// The variable that made it necessary.
        because: &'static str,
    },

    /// A launcher variable holds a value that cannot be used.
    #[error("environment variable `{name}` = `{value}`: {reason}")]
    InvalidEnv {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A rank thread panicked.
    #[error("rank {rank} panicked: {message}")]
    RankPanicked {
        /// The rank.
        rank: usize,
        /// The panic's message, when it was a string.
        message: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidConfig`].
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig { field, reason: reason.into() }
    }

    /// The collective failure inside this error, if it is one (also when it travelled through
    /// candle-train's [`candle_train::Error::Distributed`]).
    pub fn comm(&self) -> Option<&CommError> {
        match self {
            Error::Comm(e) => Some(e),
            Error::Train(candle_train::Error::Distributed(e)) => e.downcast_ref::<CommError>(),
            _ => None,
        }
    }
}

impl From<CommError> for candle_train::Error {
    fn from(e: CommError) -> Self {
        candle_train::Error::Distributed(Box::new(e))
    }
}

impl From<Error> for candle_train::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Train(e) => e,
            Error::Candle(e) => candle_train::Error::Candle(e),
            Error::Comm(e) => e.into(),
            other => candle_train::Error::Distributed(Box::new(other)),
        }
    }
}
