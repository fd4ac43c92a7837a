//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in candle-train.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from Candle (shapes, dtypes, devices, missing gradients reported by the engine).
    #[error(transparent)]
    Candle(#[from] candle::Error),

    /// A configuration value is out of range or contradicts another one.
    #[error("invalid `{field}`: {reason}")]
    InvalidConfig {
        /// The field, as the user spells it (`micro_batch`, `--steps`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A file could not be read or written.
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        /// What was being done (`read`, `write`, `rename`).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A corpus file is empty.
    #[error("corpus `{path}` is empty")]
    EmptyCorpus {
        /// The file.
        path: PathBuf,
    },

    /// A corpus file is not UTF-8 text.
    #[error("corpus `{path}` is not UTF-8 text (invalid byte at offset {offset})")]
    CorpusNotUtf8 {
        /// The file.
        path: PathBuf,
        /// Offset of the first invalid byte.
        offset: usize,
    },

    /// A corpus split is too short for one training window.
    #[error(
        "the {split} split of corpus `{path}` has {len} bytes, fewer than the {needed} one sequence needs"
    )]
    CorpusTooShort {
        /// The file.
        path: PathBuf,
        /// `train` or `validation`.
        split: &'static str,
        /// Its length in bytes.
        len: usize,
        /// Bytes needed for one sequence plus its shifted target.
        needed: usize,
    },

    /// A dtype name that is not one of the supported ones.
    #[error("unknown dtype `{0}`: expected one of f32, bf16, f16, f64")]
    UnknownDType(String),

    /// A device name that is not `cpu` or `cuda[:N]`, or a device this build cannot use.
    #[error(
        "unknown or unavailable device `{0}`: expected `cpu` or `cuda[:N]` (cuda needs the `cuda` feature)"
    )]
    UnknownDevice(String),

    /// A sequence longer than the model's context.
    #[error("sequence length {seq_len} exceeds the model's context length {context}")]
    SequenceTooLong {
        /// The requested sequence length.
        seq_len: usize,
        /// The model's context length.
        context: usize,
    },

    /// A gradient or loss was inf or NaN where that is not allowed.
    #[error("non-finite {what} at step {step}")]
    NonFinite {
        /// `loss` or `gradient`.
        what: &'static str,
        /// The optimizer step.
        step: u64,
    },

    /// Saved state does not match what it is loaded into.
    #[error("state mismatch for `{name}`: expected {expected}, found {found}")]
    StateMismatch {
        /// The tensor or field.
        name: String,
        /// What the receiver expects.
        expected: String,
        /// What the file holds.
        found: String,
    },

    /// A collective operation across data-parallel ranks failed: a peer timed out, left the
    /// group or called a different operation. The source (candle-shard's error) names the
    /// operation, the rank and the timeout.
    #[error(transparent)]
    Distributed(Box<dyn std::error::Error + Send + Sync + 'static>),

    /// A file that should hold saved state is malformed.
    #[error("malformed state file `{path}`: {reason}")]
    MalformedState {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidConfig`].
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig { field, reason: reason.into() }
    }

    /// An [`Error::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { action, path: path.into(), source }
    }
}

/// `Ok` when `value` is a finite number `>= 0`, else an [`Error::InvalidConfig`] for `field`.
pub(crate) fn check_non_negative(field: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::config(field, format!("{value} is not a finite non-negative number")))
    }
}
