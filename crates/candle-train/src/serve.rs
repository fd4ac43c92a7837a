//! Serving while training: published, immutable weight versions.
//!
//! A trainer owns a live model whose variables its optimizer changes in place, one parameter
//! at a time: reading them during a step would mix two versions. Instead the trainer
//! [`publish`](WeightVersions::publish)es a deep copy (its own variables) after a step, and
//! serving threads take the [`current`](WeightVersions::current) version: an `Arc` to a
//! complete, never-modified copy, kept alive by the request that uses it even after a newer
//! version replaces it. Swapping is one pointer store under a lock held for no computation,
//! so requests never wait for a training step.

use std::sync::{Arc, RwLock};

use crate::callback::Callback;
use crate::error::{Error, Result};
use crate::metrics::StepRecord;

/// A model that can make a deep copy of itself: same values, new variables that nothing else
/// modifies.
pub trait Snapshot: Sized {
    /// The copy.
    ///
    /// # Errors
    /// On allocation failure.
    fn snapshot(&self) -> Result<Self>;
}

/// One published version of the weights.
#[derive(Debug)]
pub struct Version<M> {
    /// 0 for the initial weights, then 1, 2, ... in publication order.
    pub number: u64,
    /// The model with this version's weights; nothing writes to it.
    pub model: M,
}

/// The latest published version, shared between a training thread and serving threads.
#[derive(Debug)]
pub struct WeightVersions<M> {
    current: RwLock<Arc<Version<M>>>,
}

impl<M: Snapshot> WeightVersions<M> {
    /// Publishes a snapshot of `model` as version 0.
    ///
    /// # Errors
    /// When the snapshot fails.
    pub fn new(model: &M) -> Result<Self> {
        Ok(Self { current: RwLock::new(Arc::new(Version { number: 0, model: model.snapshot()? })) })
    }

    /// Publishes a snapshot of the live `model` as the next version and returns its number.
    /// The copy is made before the swap, outside the lock: serving goes on meanwhile.
    /// Call it between training steps (not while an optimizer writes `model`).
    ///
    /// # Errors
    /// When the snapshot fails or the lock is poisoned.
    pub fn publish(&self, model: &M) -> Result<u64> {
        let model = model.snapshot()?;
        let mut current = self.current.write().map_err(|_| Error::Poisoned { what: "weight versions" })?;
        let number = current.number + 1;
        *current = Arc::new(Version { number, model });
        Ok(number)
    }

    /// The latest complete version. Hold the `Arc` for the whole request: every answer is
    /// then computed from one version.
    ///
    /// # Errors
    /// When the lock is poisoned.
    pub fn current(&self) -> Result<Arc<Version<M>>> {
        let current = self.current.read().map_err(|_| Error::Poisoned { what: "weight versions" })?;
        Ok(Arc::clone(&current))
    }
}

/// A Trainer [`Callback`] that publishes a snapshot of the live `model` every `every`
/// optimizer steps that stepped (a step skipped for an overflow changes nothing), and once
/// more after the last step if that one was not published: the Trainer calls it between
/// steps, when no optimizer writes the model. `model` is what serving reads (a classifier's
/// encoder, a language model); it must share its variables with what the Trainer trains.
pub struct Publisher<'a, M: Snapshot> {
    model: &'a M,
    versions: Arc<WeightVersions<M>>,
    every: u64,
    /// The last step seen, and whether a version holds it.
    last: Option<(u64, bool)>,
    on_publish: Box<dyn FnMut(u64, u64) + 'a>,
}

impl<M: Snapshot> std::fmt::Debug for Publisher<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("every", &self.every)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl<'a, M: Snapshot> Publisher<'a, M> {
    /// Publishes `model` into `versions` every `every` stepped optimizer steps.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `every` is 0.
    pub fn new(model: &'a M, versions: Arc<WeightVersions<M>>, every: u64) -> Result<Self> {
        if every == 0 {
            return Err(Error::config("publish_every", "must be at least 1"));
        }
        Ok(Self { model, versions, every, last: None, on_publish: Box::new(|_, _| ()) })
    }

    /// Calls `f(version, step)` after each publication (to log it).
    #[must_use]
    pub fn on_publish(mut self, f: impl FnMut(u64, u64) + 'a) -> Self {
        self.on_publish = Box::new(f);
        self
    }

    fn publish(&mut self, step: u64) -> Result<()> {
        let version = self.versions.publish(self.model)?;
        (self.on_publish)(version, step);
        Ok(())
    }
}

impl<M: Snapshot> Callback for Publisher<'_, M> {
    fn on_step(&mut self, record: &StepRecord) -> Result<()> {
        let due = record.stepped && record.step % self.every == 0;
        if due {
            self.publish(record.step)?;
        }
        let held = due || (!record.stepped && self.last.is_none_or(|(_, held)| held));
        self.last = Some((record.step, held));
        Ok(())
    }

    fn on_end(&mut self, failed: bool) -> Result<()> {
        match self.last {
            Some((step, false)) if !failed => {
                self.publish(step)?;
                self.last = Some((step, true));
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
