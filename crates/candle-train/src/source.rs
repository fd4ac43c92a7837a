//! What the Trainer reads its data through: [`DataSource`], keyed sampling of a model's own
//! batch type, and the byte [`Corpus`] as one such source.
//!
//! A data source draws sample `j` of the global batch of optimizer step `s` from `(seed, s, j)`
//! alone, so the data a step sees does not depend on how the global batch is cut into
//! micro-batches (accumulation, out-of-memory splits) or data-parallel ranks: a rank asks for
//! its own sample indices and gets exactly its rows of the one-rank batch.
//!
//! Losses are normalized by counts: a source says how many loss units (tokens whose label
//! counts, or samples) any range of samples holds ([`DataSource::count`]); the model's loss is
//! the mean over its micro-batch's units, and the Trainer weights each micro-batch by its share
//! of the whole global batch's units, so micro-batches (and ranks) of uneven token counts give
//! the gradient of the one large batch.

use std::ops::Range;
use std::path::Path;

use candle::Device;

use crate::checkpoint::sha256_hex;
use crate::data::{Corpus, Split};
use crate::error::Result;
use crate::models::TokenBatch;

/// The Trainer's settings a data source reads: the sequence length and how much to validate
/// on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataShape {
    /// Tokens per sequence: the window length of fixed-window sources, the longest sequence
    /// of padded ones (longer ones are cut or refused, as the source documents).
    pub seq_len: usize,
    /// At most this many validation samples.
    pub eval_samples: usize,
    /// Validation samples per batch.
    pub eval_batch: usize,
}

/// A batch and the number of loss units it holds (counted tokens, or samples): the weight of
/// its mean loss in an evaluation.
#[derive(Debug, Clone)]
pub struct Counted<B> {
    /// The batch.
    pub batch: B,
    /// Its loss units.
    pub count: usize,
}

/// A source of training and validation batches of one batch type, sampled by key.
///
/// The contract the Trainer relies on (and its tests check for the built-in sources):
/// - `batch(seed, step, a..c)` holds the rows of `batch(seed, step, a..b)` followed by those of
///   `batch(seed, step, b..c)`: a sample depends on `(seed, step, index)` only;
/// - `count(seed, step, r)` is the number of loss units the model counts in `batch(seed, step,
///   r)` (for masked token batches, the labels that are not the ignore index), and the sum of
///   the counts of the parts of a range is the count of the range;
/// - `fingerprint` changes whenever the data or the way it is cut changes, so a checkpoint
///   resumes only on the same data ([`crate::checkpoint::RunIdentity::data`]).
pub trait DataSource {
    /// The model's batch type.
    type Batch;

    /// Checks that the source can serve `shape` (e.g. holds a window of `seq_len` tokens).
    /// Called before anything runs.
    ///
    /// # Errors
    /// A data error naming what is missing.
    fn check(&self, shape: &DataShape) -> Result<()> {
        let _ = shape;
        Ok(())
    }

    /// A string that identifies the training data as `shape` cuts it (a content hash and the
    /// settings that change the samples).
    fn fingerprint(&self, shape: &DataShape) -> String;

    /// Samples `samples` of the global batch of optimizer step `step`, on `device`.
    ///
    /// # Errors
    /// A data or device error.
    fn batch(
        &self,
        seed: u64,
        step: u64,
        samples: Range<usize>,
        shape: &DataShape,
        device: &Device,
    ) -> Result<Self::Batch>;

    /// The loss units (counted tokens or samples) of `batch(seed, step, samples)`.
    ///
    /// # Errors
    /// A data error.
    fn count(&self, seed: u64, step: u64, samples: Range<usize>, shape: &DataShape) -> Result<usize>;

    /// The validation set: the same every call, at most `shape.eval_samples` samples in
    /// batches of at most `shape.eval_batch`, each with its count.
    ///
    /// # Errors
    /// A data or device error.
    fn validation(&self, shape: &DataShape, device: &Device) -> Result<Vec<Counted<Self::Batch>>>;

    /// The file the data was read from, if one: outputs that would overwrite it are refused.
    fn path(&self) -> Option<&Path> {
        None
    }
}

/// The byte corpus: windows of `seq_len` bytes at offsets keyed by `(seed, step, sample)`,
/// every target counted (the model's loss is the mean over all `samples x seq_len` targets).
impl DataSource for Corpus {
    type Batch = TokenBatch;

    fn check(&self, shape: &DataShape) -> Result<()> {
        self.check_seq_len(shape.seq_len)
    }

    /// `bytes seq_len=N sha256=H`, H the SHA-256 of the training split.
    fn fingerprint(&self, shape: &DataShape) -> String {
        format!("bytes seq_len={} sha256={}", shape.seq_len, sha256_hex(self.split(Split::Train)))
    }

    fn batch(
        &self,
        seed: u64,
        step: u64,
        samples: Range<usize>,
        shape: &DataShape,
        device: &Device,
    ) -> Result<TokenBatch> {
        self.train_batch(seed, step, samples.start, samples.len(), shape.seq_len, device)
    }

    fn count(&self, _seed: u64, _step: u64, samples: Range<usize>, shape: &DataShape) -> Result<usize> {
        Ok(samples.len() * shape.seq_len)
    }

    fn validation(&self, shape: &DataShape, device: &Device) -> Result<Vec<Counted<TokenBatch>>> {
        let batches = self.validation_batches(shape.eval_batch, shape.eval_samples, shape.seq_len, device)?;
        Ok(batches
            .into_iter()
            .map(|batch| {
                let count = batch.targets.elem_count();
                Counted { batch, count }
            })
            .collect())
    }

    fn path(&self) -> Option<&Path> {
        Some(Corpus::path(self))
    }
}
