//! The Trainer's seam for what happens around steps: a [`Callback`] sees every step's record,
//! every evaluation's metrics and every checkpoint written. The progress bar and the JSONL
//! metrics file are callbacks; a user adds their own (logging, early reporting) through
//! [`crate::trainer::Hooks`].

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};
use crate::evaluate::Metrics;
use crate::memory;
use crate::metrics::{MetricsWriter, StepRecord};

/// Called by the Trainer as a run goes. Every method does nothing by default. An error stops
/// the run (after the step it came from).
pub trait Callback {
    /// Before the first step; `start_step` is 0, or the resumed checkpoint's step, of `total`.
    ///
    /// # Errors
    /// Any error of the callback's.
    fn on_start(&mut self, start_step: u64, total: u64) -> Result<()> {
        let _ = (start_step, total);
        Ok(())
    }

    /// After every optimizer step (skipped ones included), with its record.
    ///
    /// # Errors
    /// Any error of the callback's.
    fn on_step(&mut self, record: &StepRecord) -> Result<()> {
        let _ = record;
        Ok(())
    }

    /// After every evaluation: `step` is the number of steps done (the start's is the start
    /// step).
    ///
    /// # Errors
    /// Any error of the callback's.
    fn on_evaluation(&mut self, step: u64, metrics: &Metrics) -> Result<()> {
        let _ = (step, metrics);
        Ok(())
    }

    /// After a checkpoint of `step` was written to `path`.
    ///
    /// # Errors
    /// Any error of the callback's.
    fn on_checkpoint(&mut self, step: u64, path: &Path) -> Result<()> {
        let _ = (step, path);
        Ok(())
    }

    /// After the last step and the final evaluation, or when the run stops with an error
    /// (`failed`).
    ///
    /// # Errors
    /// Any error of the callback's.
    fn on_end(&mut self, failed: bool) -> Result<()> {
        let _ = failed;
        Ok(())
    }
}

/// Appends one JSON line per step to the metrics file.
impl Callback for MetricsWriter {
    fn on_step(&mut self, record: &StepRecord) -> Result<()> {
        self.write(record)
    }
}

/// A progress bar on stderr (hidden when `visible` is false), its message updated every
/// `log_interval` steps with the loss, throughput and peak memory.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    log_interval: u64,
    total: u64,
}

impl Progress {
    /// A bar, drawn only when `visible`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the bar's template is refused.
    pub fn new(visible: bool, log_interval: usize) -> Result<Self> {
        let bar = if visible { ProgressBar::new(0) } else { ProgressBar::hidden() };
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .map_err(|e| Error::config("progress", e.to_string()))?
                .progress_chars("=> "),
        );
        Ok(Self { bar, log_interval: log_interval.max(1) as u64, total: 0 })
    }
}

impl Callback for Progress {
    fn on_start(&mut self, start_step: u64, total: u64) -> Result<()> {
        self.total = total;
        self.bar.set_length(total);
        self.bar.set_position(start_step.min(total));
        Ok(())
    }

    fn on_step(&mut self, record: &StepRecord) -> Result<()> {
        self.bar.inc(1);
        if record.step % self.log_interval == 0 || record.step == self.total {
            self.bar.set_message(format!(
                "loss {:.4} | {:.0} tok/s | peak {}",
                record.loss,
                record.tokens_per_s,
                memory::mib(record.peak_bytes)
            ));
        }
        Ok(())
    }

    fn on_end(&mut self, failed: bool) -> Result<()> {
        if failed {
            self.bar.abandon();
        } else {
            self.bar.finish();
        }
        Ok(())
    }
}
