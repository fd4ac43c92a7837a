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
    /// Bytes moved between the host and the device in this step, by cause (all zero on the
    /// CPU device; absent from files written before it was recorded).
    #[serde(default)]
    pub transfers: crate::updater::Transfers,
}

/// The largest metrics file a resumed run reads back (about ten million records).
pub const MAX_METRICS_BYTES: u64 = 4 << 30;

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

    /// Continues the file of a run resumed at `step`: keeps its records of steps up to `step`
    /// (in order; later ones, and a torn last line of a crash, are dropped), rewritten
    /// atomically, then appends. A missing file starts empty.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read or written.
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let old = match std::fs::symlink_metadata(path) {
            Ok(_) => crate::io::read_bounded(path, MAX_METRICS_BYTES)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io("read", path, e)),
        };
        let mut kept = Vec::new();
        for line in old.split(|&b| b == b'\n') {
            let Ok(record) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
            if record.get("step").and_then(serde_json::Value::as_u64).is_some_and(|s| s <= step) {
                kept.extend_from_slice(line);
                kept.push(b'\n');
            }
        }
        crate::io::write_atomic(path, &kept)?;
        let file =
            std::fs::OpenOptions::new().append(true).open(path).map_err(|e| Error::io("open", path, e))?;
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
