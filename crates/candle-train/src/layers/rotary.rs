//! Rotary position embeddings (RoPE) in Hugging Face LLaMA's half-split form (dimension `i`
//! rotates with dimension `i + head_dim/2`), with a hand-written backward: Candle's fused
//! `rotary_emb::rope` has no backward rule.

use candle::{Device, Result, Tensor, D};

use crate::layers::custom_grad::custom1;

/// The cosine and sine tables of RoPE for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct Rotary {
    /// `[max_positions, head_dim]` in F32: `cos(p * inv_freq[i mod head_dim/2])`.
    cos: Tensor,
    /// `[max_positions, head_dim]` in F32, as `cos` with the sine.
    sin: Tensor,
}

impl Rotary {
    /// The tables for heads of `head_dim` (even) dimensions, base `theta`, for positions up to
    /// `max_positions`. The inverse frequencies `theta^(-2i/head_dim)` and the angles are
    /// computed in F32, as Hugging Face and candle-transformers compute them.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for an odd or zero `head_dim`, zero `max_positions` or a
    /// non-positive `theta`; a Candle error on allocation failure.
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, device: &Device) -> crate::Result<Self> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(crate::Error::config(
                "head_dim",
                format!("{head_dim} is not a positive even number"),
            ));
        }
        if max_positions == 0 {
            return Err(crate::Error::config("max_position_embeddings", "must be at least 1"));
        }
        if !(theta.is_finite() && theta > 0.0) {
            return Err(crate::Error::config("rope_theta", format!("{theta} is not a positive number")));
        }
        let base = theta as f32;
        let inv_freq: Vec<f32> =
            (0..head_dim).step_by(2).map(|i| 1f32 / base.powf(i as f32 / head_dim as f32)).collect();
        Self::from_inverse_frequencies(&inv_freq, max_positions, device)
    }

    /// The tables for the inverse frequencies `inv_freq` (one per pair of dimensions: heads of
    /// `2 * inv_freq.len()` dimensions), for positions up to `max_positions`: for frequencies
    /// that a rope scaling rule has adjusted ([`llama3_inverse_frequencies`]). The angles are
    /// computed in F32.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for no frequencies or zero `max_positions`; a Candle
    /// error on allocation failure.
    pub fn from_inverse_frequencies(
        inv_freq: &[f32],
        max_positions: usize,
        device: &Device,
    ) -> crate::Result<Self> {
        if inv_freq.is_empty() {
            return Err(crate::Error::config("head_dim", "0 is not a positive even number"));
        }
        if max_positions == 0 {
            return Err(crate::Error::config("max_position_embeddings", "must be at least 1"));
        }
        let head_dim = 2 * inv_freq.len();
        let mut angles = Vec::with_capacity(max_positions * head_dim);
        for p in 0..max_positions {
            // Both halves of a head share the frequencies (`cat(freqs, freqs)` in HF).
            for _ in 0..2 {
                angles.extend(inv_freq.iter().map(|f| p as f32 * f));
            }
        }
        let angles = Tensor::from_vec(angles, (max_positions, head_dim), device)?;
        Ok(Self { cos: angles.cos()?, sin: angles.sin()? })
    }

    /// The longest sequence the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims().first().copied().unwrap_or(0)
    }

    /// Rotates `x` (`[batch, heads, t, head_dim]`, positions `0..t`):
    /// `x * cos + rotate_half(x) * sin`, in `x`'s dtype (the tables are cast to it). The
    /// backward is the inverse rotation `g * cos - rotate_half(g * sin)`; the graph keeps
    /// nothing but `x` and the result.
    ///
    /// # Errors
    /// When `x` is not four-dimensional, its last dimension is not the tables' `head_dim`, or
    /// `t` exceeds [`Rotary::max_positions`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        let (max_positions, head_dim) = self.cos.dims2()?;
        if d != head_dim {
            candle::bail!("rotary: heads of {d} dimensions, tables of {head_dim}");
        }
        if t > max_positions {
            candle::bail!("rotary: {t} positions exceed the tables' {max_positions}");
        }
        let dtype = x.dtype();
        let cos = self.cos.narrow(0, 0, t)?.to_dtype(dtype)?;
        let sin = self.sin.narrow(0, 0, t)?.to_dtype(dtype)?;
        let value = rotate(&x.detach(), &cos, &sin)?;
        custom1("rotary", x, value, move |_, _, g| {
            // The transpose of `rotate_half` is `-rotate_half`.
            let grad = (g.broadcast_mul(&cos)? - rotate_half(&g.broadcast_mul(&sin)?)?)?;
            Ok(Some(grad))
        })
    }
}

impl Rotary {
    /// Rotates `x` (`[batch, heads, t, head_dim]`) as the positions `offset..offset + t`, for
    /// decoding with a key/value cache. Built from ordinary ops (differentiable, but meant for
    /// inference); at `offset` 0 the values equal [`Rotary::forward`]'s.
    ///
    /// # Errors
    /// As [`Rotary::forward`], with `offset + t` bounded by the tables.
    pub fn forward_at(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        let (max_positions, head_dim) = self.cos.dims2()?;
        if d != head_dim {
            candle::bail!("rotary: heads of {d} dimensions, tables of {head_dim}");
        }
        if offset + t > max_positions {
            candle::bail!("rotary: {} positions exceed the tables' {max_positions}", offset + t);
        }
        let cos = self.cos.narrow(0, offset, t)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, offset, t)?.to_dtype(x.dtype())?;
        rotate(x, &cos, &sin)
    }
}

/// `x * cos + rotate_half(x) * sin` with `cos`, `sin` (`[t, d]`) broadcast over batch and heads.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// `cat(-x2, x1)` over the last dimension, where `x1`, `x2` are its two halves.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// The inverse frequencies of LLaMA 3.1's rope scaling (`rope_scaling.rope_type = "llama3"`):
/// from the base frequencies `theta^(-2i/head_dim)`, wavelengths shorter than
/// `original_max_positions / high_freq_factor` are kept, those longer than
/// `original_max_positions / low_freq_factor` divided by `factor`, and those between
/// interpolated smoothly, in F32 as `transformers`' `_compute_llama3_parameters` and
/// candle-transformers compute them.
pub fn llama3_inverse_frequencies(
    head_dim: usize,
    theta: f64,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_max_positions: usize,
) -> Vec<f32> {
    let base = theta as f32;
    let old_context = original_max_positions as f32;
    let low_freq_wavelen = old_context / low_freq_factor;
    let high_freq_wavelen = old_context / high_freq_factor;
    (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
        .map(|freq| {
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                freq
            } else if wavelen > low_freq_wavelen {
                freq / factor
            } else {
                let smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        })
        .collect()
}

/// Converts the rows of a query or key projection weight (`[heads * head_dim, in]`) from the
/// interleaved rotary layout of GGUF files (llama.cpp pairs dimensions `2i`, `2i + 1`) to
/// Hugging Face's half-split layout (pairs `i`, `i + head_dim/2`): the inverse of the
/// permutation `convert_hf_to_gguf.py` applies. Queries and keys permuted alike give the same
/// attention scores under the matching rotary form.
///
/// # Errors
/// When the row count is not `heads` times an even head dimension.
pub fn interleaved_to_half_split(weight: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
        candle::bail!("cannot split {rows} rows into {heads} heads of an even dimension");
    }
    let half = rows / heads / 2;
    weight.reshape((heads, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_norms_and_position_zero_is_the_identity() -> Result<()> {
        let rotary =
            Rotary::new(8, 16, 10_000.0, &Device::Cpu).map_err(|e| candle::Error::Msg(e.to_string()))?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &Device::Cpu)?;
        let y = rotary.forward(&x)?;
        let norms = |t: &Tensor| t.sqr()?.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>();
        for (a, b) in norms(&x)?.iter().zip(norms(&y)?) {
            assert!((a - b).abs() <= 1e-5 * a.max(1.0), "{a} vs {b}");
        }
        let first = (x.narrow(2, 0, 1)? - y.narrow(2, 0, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(first, 0.0);
        Ok(())
    }

    #[test]
    fn unpermuting_inverts_the_gguf_permutation() -> Result<()> {
        // convert_hf_to_gguf.py: reshape(heads, 2, half, in).swapaxes(1, 2).
        let hf = Tensor::arange(0f32, 2.0 * 8.0 * 3.0, &Device::Cpu)?.reshape((16, 3))?;
        let gguf = hf.reshape((2, 2, 4, 3))?.transpose(1, 2)?.contiguous()?.reshape((16, 3))?;
        let back = interleaved_to_half_split(&gguf, 2)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        assert!(interleaved_to_half_split(&hf, 3).is_err());
        Ok(())
    }
}
