//! Dropout driven by an explicit seeded generator, so a recomputed segment replays the same
//! mask (Candle's `ops::dropout` draws from an unseedable device generator).

use candle::{Result, Tensor};
use candle_ckpt::Rng;

/// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    p: f32,
}

impl Dropout {
    /// A dropout layer with drop probability `p`.
    ///
    /// # Errors
    /// When `p` is not in `[0, 1)`.
    pub fn new(p: f32) -> crate::Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(crate::Error::config("dropout", format!("{p} is not a probability in [0, 1)")));
        }
        Ok(Self { p })
    }

    /// The drop probability.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// Applies dropout with a mask drawn from `rng`; the identity when `training` is false or
    /// `p` is zero (and then `rng` is not advanced). When `rng` carries a
    /// [`SampleWindow`](candle_ckpt::SampleWindow) (`x` holds rows `start .. start + len` of a
    /// batch of `total`, batch-major), the mask is those rows of the whole batch's mask: the
    /// draws of the other rows are skipped.
    ///
    /// # Errors
    /// On a tensor error.
    pub fn forward(&self, x: &Tensor, rng: &mut Rng, training: bool) -> Result<Tensor> {
        if !training || self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep_scale = 1.0 / (1.0 - self.p as f64);
        let n = x.elem_count();
        // A share of a larger batch (batch-major): skip the other rows' draws, before and after.
        let skips = rng.window().and_then(|w| {
            let per_row = (n as u64).checked_div(w.len).filter(|k| k * w.len == n as u64)?;
            Some((w.start * per_row, w.total.checked_sub(w.start + w.len)? * per_row))
        });
        if let Some((before, _)) = skips {
            rng.skip(before);
        }
        // One pass and a one-byte mask on the CPU (the same draws and values).
        if let Some(y) = crate::layers::fused::dropout(x, self.p, rng)? {
            if let Some((_, after)) = skips {
                rng.skip(after);
            }
            return Ok(y);
        }
        let mut draw = || if rng.uniform_f32() < self.p { 0.0 } else { keep_scale };
        let mask = if x.dtype() == candle::DType::F64 {
            Tensor::from_vec((0..n).map(|_| draw()).collect::<Vec<f64>>(), x.shape(), x.device())?
        } else {
            let values: Vec<f32> = (0..n).map(|_| draw() as f32).collect();
            Tensor::from_vec(values, x.shape(), x.device())?.to_dtype(x.dtype())?
        };
        if let Some((_, after)) = skips {
            rng.skip(after);
        }
        x.mul(&mask)
    }
}
