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

    /// A parameter was read while it is released (ZeRO stage 3 frees a parameter's storage
    /// outside its segment's forward, recompute and backward).
    #[error(
        "parameter `{name}` is released: ZeRO stage 3 holds it only while its segment runs (read it through the model's forward, or after `ShardedModel::into_inner`)"
    )]
    ParameterReleased {
        /// The parameter's full name.
        name: String,
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

    /// A step needed more memory than the limit allows (the configured `max_memory`, or a
    /// CUDA allocation that failed).
    #[error("out of memory on {device}: {needed} bytes live at {at}, over the limit of {limit} bytes")]
    OutOfMemory {
        /// The device (`cpu`, `cuda:0`).
        device: String,
        /// Bytes live (or requested) when the limit was hit; 0 when the device did not say.
        needed: usize,
        /// The limit in bytes; 0 when it is the device's own capacity.
        limit: usize,
        /// Where in the step: `forward of h.3`, `backward of head`.
        at: String,
    },

    /// Too many optimizer steps in a row had a non-finite loss or gradient.
    #[error(
        "{count} steps in a row had a non-finite loss or gradient (the last at step {step}); stopped. {}",
        match last_checkpoint {
            Some(p) => format!("The last good checkpoint is `{}`.", p.display()),
            None => "No checkpoint was written.".to_string(),
        }
    )]
    TooManyNonFiniteSteps {
        /// Consecutive skipped steps.
        count: usize,
        /// The optimizer step of the last one (1-based).
        step: u64,
        /// The newest checkpoint written before them, if any.
        last_checkpoint: Option<PathBuf>,
    },

    /// Every label of a step's global batch is the ignore index: there is no loss to
    /// normalize by.
    #[error("step {step}: the global batch counts no loss unit (every label is the ignore index -100); drop such samples from the data")]
    NothingCounted {
        /// The optimizer step (1-based).
        step: u64,
    },

    /// A checkpoint cannot be used: missing, torn, corrupted, from another format version, or
    /// written by a run this one cannot continue.
    #[error("checkpoint `{path}`: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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

    /// A thread panicked while holding a lock on shared state.
    #[error("{what}: a thread panicked while holding the lock")]
    Poisoned {
        /// The shared state.
        what: &'static str,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidConfig`].
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig { field, reason: reason.into() }
    }

    /// An [`Error::Checkpoint`].
    pub fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Checkpoint { path: path.into(), reason: reason.into() }
    }

    /// Whether this is an out-of-memory error: ours ([`Error::OutOfMemory`]) or a device's
    /// allocation failure reported through Candle (CUDA's `CUDA_ERROR_OUT_OF_MEMORY`).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Self::OutOfMemory { .. } => true,
            Self::Candle(e) => is_device_oom(e),
            _ => false,
        }
    }

    /// An [`Error::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { action, path: path.into(), source }
    }
}

/// Whether a Candle error is a device allocation failure. CUDA reports it as the driver error
/// `CUDA_ERROR_OUT_OF_MEMORY` (cudarc's `DriverError` prints its name), possibly wrapped in
/// Candle's context or backtrace variants, which print the inner error.
pub fn is_device_oom(error: &candle::Error) -> bool {
    let text = error.to_string();
    text.contains("CUDA_ERROR_OUT_OF_MEMORY") || text.contains("cudaErrorMemoryAllocation")
}

/// Turns a device allocation failure into [`Error::OutOfMemory`] on `device`; other errors
/// pass through.
pub fn classify_oom(error: Error, device: &str, at: &str) -> Error {
    match error {
        Error::Candle(e) if is_device_oom(&e) => {
            Error::OutOfMemory { device: device.to_string(), needed: 0, limit: 0, at: at.to_string() }
        }
        other => other,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cuda_allocation_failure_is_an_out_of_memory_error_however_wrapped() {
        // cudarc's DriverError prints as `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")`,
        // which Candle wraps (here with context, as its backtrace and context variants do).
        let driver = candle::Error::Msg(r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#.into());
        let wrapped = Error::Candle(driver.context("matmul"));
        assert!(wrapped.is_out_of_memory());
        let typed = classify_oom(wrapped, "cuda:0", "a training step");
        assert!(
            matches!(&typed, Error::OutOfMemory { device, at, .. } if device == "cuda:0" && at == "a training step")
        );
        let other = Error::Candle(candle::Error::Msg("shape mismatch".into()));
        assert!(!other.is_out_of_memory());
        assert!(matches!(classify_oom(other, "cpu", "x"), Error::Candle(_)));
    }
}
