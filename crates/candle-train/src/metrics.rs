//! Per-step training records and the JSONL file they are appended to.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What one optimizer step did, as written to the metrics file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The optimizer step (1-based: the number of steps done).
    pub step: u64,
    /// The mean training loss over the step's micro-batches (nats per token).
    pub loss: f64,
    /// The learning rate used.
    pub lr: f64,
    /// The gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the optimizer stepped.
    pub stepped: bool,
    /// Wall time of the step (forward, backward, optimizer), seconds.
    pub step_time_s: f64,
    /// Training tokens per second in this step.
    pub tokens_per_s: f64,
    /// Peak live heap bytes during the step (0 without the counting allocator).
    pub peak_bytes: usize,
    /// The loss scale used in this step, under loss scaling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// Validation loss, on steps where it was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// Appends one JSON object per line, flushing each line so a crash loses at most one.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsWriter {
    /// Creates (truncates) the file.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be created.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io("create", path, e))?;
        Ok(Self { path: path.to_path_buf(), out: BufWriter::new(file) })
    }

    /// Writes one record as a line.
    ///
    /// # Errors
    /// [`Error::Io`] on a write failure.
    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        let line = serde_json::to_string(record)
            .map_err(|e| Error::io("serialize a record for", &self.path, e.into()))?;
        writeln!(self.out, "{line}")
            .and_then(|()| self.out.flush())
            .map_err(|e| Error::io("write", &self.path, e))
    }
}
