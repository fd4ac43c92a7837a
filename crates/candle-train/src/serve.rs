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

use crate::error::{Error, Result};

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
