//! Text corpora as byte tokens: loading, a train/validation split, and deterministic seeded
//! batching.
//!
//! Sample `j` of the global batch at optimizer step `s` starts at an offset drawn from a
//! generator keyed by `(seed, s, j)` alone, so the data a step sees does not depend on how the
//! global batch is cut into micro-batches (accumulation) or ranks.

use std::path::{Path, PathBuf};

use candle::{Device, Tensor};
use candle_ckpt::RngKey;

use crate::error::{Error, Result};
use crate::models::TokenBatch;

/// Which part of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The leading part, used for training.
    Train,
    /// The trailing part, held out.
    Validation,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
        }
    }
}

/// A UTF-8 text as bytes, split into a leading training part and a trailing validation part.
#[derive(Debug, Clone)]
pub struct Corpus {
    path: PathBuf,
    train: Vec<u8>,
    validation: Vec<u8>,
}

impl Corpus {
    /// Reads a UTF-8 text file and holds out its last `validation_fraction` for validation.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::EmptyCorpus`],
    /// [`Error::CorpusNotUtf8`], or [`Error::InvalidConfig`] for a fraction outside (0, 1).
    pub fn from_file(path: &Path, validation_fraction: f64) -> Result<Self> {
        // Size from the metadata first; a FIFO or device is refused, not read without end.
        let bytes = crate::io::read_bounded(path, crate::io::MAX_CORPUS_BYTES)?;
        Self::from_bytes(path, bytes, validation_fraction)
    }

    /// A corpus from bytes already in memory; `path` names it in errors.
    ///
    /// # Errors
    /// As [`Corpus::from_file`], without the I/O.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>, validation_fraction: f64) -> Result<Self> {
        if !(validation_fraction > 0.0 && validation_fraction < 1.0) {
            return Err(Error::config(
                "validation_fraction",
                format!("{validation_fraction} is not in (0, 1)"),
            ));
        }
        if bytes.is_empty() {
            return Err(Error::EmptyCorpus { path: path.to_path_buf() });
        }
        if let Err(e) = std::str::from_utf8(&bytes) {
            return Err(Error::CorpusNotUtf8 { path: path.to_path_buf(), offset: e.valid_up_to() });
        }
        let n_val = ((bytes.len() as f64 * validation_fraction).round() as usize).clamp(1, bytes.len());
        let mut train = bytes;
        let validation = train.split_off(train.len() - n_val);
        Ok(Self { path: path.to_path_buf(), train, validation })
    }

    /// The file the corpus came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bytes of one split.
    pub fn split(&self, split: Split) -> &[u8] {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
        }
    }

    /// The entropy of the training split's byte unigram distribution, in nats per byte: the
    /// loss of the best model that ignores context. A language model must beat it.
    pub fn unigram_entropy(&self) -> f64 {
        let mut counts = [0u64; 256];
        for &b in &self.train {
            counts[b as usize] += 1;
        }
        let n = self.train.len() as f64;
        counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n;
                -p * p.ln()
            })
            .sum()
    }

    /// Checks that both splits hold at least one window of `seq_len` tokens plus the target.
    ///
    /// # Errors
    /// [`Error::CorpusTooShort`] naming the split.
    pub fn check_seq_len(&self, seq_len: usize) -> Result<()> {
        for split in [Split::Train, Split::Validation] {
            let len = self.split(split).len();
            if len < seq_len + 1 {
                return Err(Error::CorpusTooShort {
                    path: self.path.clone(),
                    split: split.name(),
                    len,
                    needed: seq_len + 1,
                });
            }
        }
        Ok(())
    }

    fn batch_from_offsets(
        &self,
        split: Split,
        offsets: &[usize],
        seq_len: usize,
        device: &Device,
    ) -> Result<TokenBatch> {
        let data = self.split(split);
        let mut inputs = Vec::with_capacity(offsets.len() * seq_len);
        let mut targets = Vec::with_capacity(offsets.len() * seq_len);
        for &o in offsets {
            inputs.extend(data[o..o + seq_len].iter().map(|&b| b as u32));
            targets.extend(data[o + 1..o + seq_len + 1].iter().map(|&b| b as u32));
        }
        let shape = (offsets.len(), seq_len);
        Ok(TokenBatch {
            inputs: Tensor::from_vec(inputs, shape, device)?,
            targets: Tensor::from_vec(targets, shape, device)?,
        })
    }

    /// Samples `count` training windows of `seq_len` tokens: samples `first .. first + count`
    /// of the global batch of optimizer step `step`.
    ///
    /// # Errors
    /// [`Error::CorpusTooShort`] if the training split is shorter than a window.
    pub fn train_batch(
        &self,
        seed: u64,
        step: u64,
        first: usize,
        count: usize,
        seq_len: usize,
        device: &Device,
    ) -> Result<TokenBatch> {
        self.check_seq_len(seq_len)?;
        let n_starts = (self.train.len() - seq_len) as u64;
        let offsets: Vec<usize> = (first..first + count)
            .map(|j| {
                RngKey { seed, step, micro_batch: j as u64, segment: 0, stream: 0x_da7a }
                    .rng()
                    .below(n_starts) as usize
            })
            .collect();
        self.batch_from_offsets(Split::Train, &offsets, seq_len, device)
    }

    /// The validation set: up to `max_windows` non-overlapping windows spread evenly over the
    /// validation split, in batches of `batch_size`. The same every call.
    ///
    /// # Errors
    /// [`Error::CorpusTooShort`] if the validation split is shorter than a window.
    pub fn validation_batches(
        &self,
        batch_size: usize,
        max_windows: usize,
        seq_len: usize,
        device: &Device,
    ) -> Result<Vec<TokenBatch>> {
        self.check_seq_len(seq_len)?;
        let max_start = self.validation.len() - 1 - seq_len;
        let available = (self.validation.len() - 1) / seq_len;
        let n = available.min(max_windows).max(1);
        // Evenly spaced; (n - 1) * seq_len <= max_start, so windows never overlap.
        let offsets: Vec<usize> =
            if n == 1 { vec![0] } else { (0..n).map(|i| i * max_start / (n - 1)).collect() };
        offsets
            .chunks(batch_size.max(1))
            .map(|chunk| self.batch_from_offsets(Split::Validation, chunk, seq_len, device))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(text: &str) -> Result<Corpus> {
        Corpus::from_bytes(Path::new("mem.txt"), text.as_bytes().to_vec(), 0.2)
    }

    #[test]
    fn bad_corpora_are_named_errors() {
        let empty = Corpus::from_bytes(Path::new("e.txt"), vec![], 0.1);
        assert_eq!(empty.err().map(|e| e.to_string()).as_deref(), Some("corpus `e.txt` is empty"));
        let latin1 = Corpus::from_bytes(Path::new("l.txt"), vec![b'a', 0xe9, b'b'], 0.1);
        assert!(matches!(latin1, Err(Error::CorpusNotUtf8 { offset: 1, .. })));
        let missing = Corpus::from_file(Path::new("/no/such/corpus.txt"), 0.1);
        assert!(matches!(missing, Err(Error::Io { action: "read", .. })));
        assert!(matches!(
            corpus("short").and_then(|c| c.check_seq_len(8)),
            Err(Error::CorpusTooShort { .. })
        ));
    }

    #[test]
    fn batches_are_deterministic_and_independent_of_the_cut() -> Result<()> {
        let c = corpus(&"the quick brown fox jumps over the lazy dog. ".repeat(50))?;
        let dev = Device::Cpu;
        let whole = c.train_batch(3, 7, 0, 8, 16, &dev)?;
        let first = c.train_batch(3, 7, 0, 4, 16, &dev)?;
        let second = c.train_batch(3, 7, 4, 4, 16, &dev)?;
        let joined = Tensor::cat(&[&first.inputs, &second.inputs], 0)?;
        assert_eq!(whole.inputs.to_vec2::<u32>()?, joined.to_vec2::<u32>()?);
        let inputs = whole.inputs.to_vec2::<u32>()?;
        let targets = whole.targets.to_vec2::<u32>()?;
        for (x, y) in inputs.iter().zip(&targets) {
            assert_eq!(&x[1..], &y[..15], "targets are the inputs shifted by one");
        }
        let other_step = c.train_batch(3, 8, 0, 8, 16, &dev)?;
        assert_ne!(inputs, other_step.inputs.to_vec2::<u32>()?);
        let val = c.validation_batches(4, 100, 16, &dev)?;
        assert!(!val.is_empty());
        Ok(())
    }

    #[test]
    fn unigram_entropy_of_two_equiprobable_bytes_is_ln_2() -> Result<()> {
        let c = corpus(&"ab".repeat(100))?;
        assert!((c.unigram_entropy() - std::f64::consts::LN_2).abs() < 1e-12);
        Ok(())
    }
}
