//! AdamW with both moments in 8 bits (blockwise dynamic quantization, see [`super::quant`]).
//!
//! Parameters of at least [`MIN_QUANTIZED`] elements keep `m` in the signed code and `v` in the
//! unsigned code, one byte each plus one FP32 scale per block of [`BLOCK`] values; smaller ones (biases,
//! norms) keep FP32 moments, as bitsandbytes does. The choice is per original parameter, made
//! from the lengths given at construction. The update walks a parameter block by block:
//! dequantize the block's `m` and `v` into two block-sized float buffers on the stack, apply exactly
//! [`super::AdamW`]'s per-element arithmetic, requantize the block with its new maximum. No
//! FP32 copy of the state is ever made.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::adamw::{update_slice, update_slice_parallel, Scalars};
use super::quant::{dequantize_block, quantize_block, Code, Quantized, BLOCK};
use super::{check_len, AdamWConfig, Optimizer, OptimizerState, PARALLEL_CHUNK};
use crate::error::{Error, Result};

/// Parameters with fewer elements keep 32-bit state.
pub const MIN_QUANTIZED: usize = 4096;

/// One parameter's two moments.
#[derive(Debug, Clone, PartialEq)]
enum Moments {
    Full { m: Vec<f32>, v: Vec<f32> },
    Quantized { m: Quantized, v: Quantized },
}

impl Moments {
    /// Moments for `len` values of a parameter of `original` elements (the same, unless a
    /// shard of it): quantized when the original parameter is large enough.
    fn new(len: usize, original: usize) -> Self {
        if original >= MIN_QUANTIZED {
            Moments::Quantized { m: Quantized::zeros(len), v: Quantized::zeros(len) }
        } else {
            Moments::Full { m: vec![0.0; len], v: vec![0.0; len] }
        }
    }

    /// The bytes of [`Moments::new`]`(len, original)`.
    fn bytes_for(len: usize, original: usize) -> usize {
        if original >= MIN_QUANTIZED {
            2 * (len + 4 * len.div_ceil(BLOCK))
        } else {
            8 * len
        }
    }

    fn len(&self) -> usize {
        match self {
            Moments::Full { m, .. } => m.len(),
            Moments::Quantized { m, .. } => m.codes.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Moments::Full { m, v } => 4 * (m.len() + v.len()),
            Moments::Quantized { m, v } => m.bytes() + v.bytes(),
        }
    }
}

/// AdamW over 8-bit moments.
#[derive(Debug, Clone)]
pub struct AdamW8bit {
    config: AdamWConfig,
    step: u64,
    moments: Vec<Moments>,
}

impl AdamW8bit {
    /// 8-bit AdamW for parameters of the given lengths, moments at zero.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bad hyper-parameters.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, step: 0, moments: sizes.iter().map(|&n| Moments::new(n, n)).collect() })
    }

    /// 8-bit AdamW for pieces of parameters, as a ZeRO rank steps them: `(len, original)` per
    /// piece, `original` being the whole parameter's element count. The 32-bit-or-8-bit choice
    /// follows the original parameter, so a rank's slice of a large matrix stays 8-bit however
    /// small the slice; blocks start at the piece's first element.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for bad hyper-parameters, or a piece longer than its parameter.
    pub fn for_pieces(config: AdamWConfig, pieces: &[(usize, usize)]) -> Result<Self> {
        config.validate()?;
        if let Some((len, original)) = pieces.iter().find(|(len, original)| len > original) {
            return Err(Error::config(
                "pieces",
                format!("a piece of {len} elements is longer than its parameter of {original}"),
            ));
        }
        Ok(Self { config, step: 0, moments: pieces.iter().map(|&(n, o)| Moments::new(n, o)).collect() })
    }

    /// The optimizer-state bytes this optimizer holds for parameters of the given lengths.
    pub fn state_bytes_for(sizes: &[usize]) -> usize {
        sizes.iter().map(|&n| Moments::bytes_for(n, n)).sum()
    }

    /// The optimizer-state bytes [`AdamW8bit::for_pieces`] holds for these `(len, original)`
    /// pieces.
    pub fn state_bytes_for_pieces(pieces: &[(usize, usize)]) -> usize {
        pieces.iter().map(|&(n, original)| Moments::bytes_for(n, original)).sum()
    }

    /// Steps parameter `index`: [`Optimizer::update`], or with `parallel` its
    /// [`Optimizer::update_parallel`].
    fn step_parameter(
        &mut self,
        index: usize,
        param: &mut [f32],
        grad: &[f32],
        lr: f64,
        decay: bool,
        parallel: bool,
    ) -> Result<()> {
        let s = Scalars::new(&self.config, self.step.max(1), lr, decay);
        let c = PARALLEL_CHUNK;
        match (self.moments(index, param, grad)?, parallel) {
            (Moments::Full { m, v }, false) => update_slice(&s, param, grad, m, v),
            (Moments::Full { m, v }, true) => update_slice_parallel(&s, param, grad, m, v),
            (Moments::Quantized { m, v }, false) => {
                update_blocks(&s, param, grad, (&mut m.codes, &mut m.scales), (&mut v.codes, &mut v.scales))
            }
            // A chunk is a whole number of blocks: its codes and its scales go together.
            (Moments::Quantized { m, v }, true) => param
                .par_chunks_mut(c)
                .zip(grad.par_chunks(c))
                .zip(m.codes.par_chunks_mut(c).zip(m.scales.par_chunks_mut(c / BLOCK)))
                .zip(v.codes.par_chunks_mut(c).zip(v.scales.par_chunks_mut(c / BLOCK)))
                .for_each(|(((p, g), m), v)| update_blocks(&s, p, g, m, v)),
        }
        Ok(())
    }

    /// Parameter `index`'s moments, after checking the slices' lengths against them.
    fn moments(&mut self, index: usize, param: &[f32], grad: &[f32]) -> Result<&mut Moments> {
        let count = self.moments.len();
        let moments = self.moments.get_mut(index).ok_or_else(|| Error::StateMismatch {
            name: format!("parameter {index}"),
            expected: format!("an index below {count}"),
            found: index.to_string(),
        })?;
        check_len(index, moments.len(), param, grad)?;
        Ok(moments)
    }
}

/// Steps `param` over quantized moments block by block: dequantize a block's `m` and `v` (codes
/// and one scale per block) into two stack buffers, apply AdamW's element arithmetic, and
/// requantize them with their new maxima. The slices start at a block boundary.
fn update_blocks(
    s: &Scalars,
    param: &mut [f32],
    grad: &[f32],
    (m_codes, m_scales): (&mut [u8], &mut [f32]),
    (v_codes, v_scales): (&mut [u8], &mut [f32]),
) {
    let (mut mb, mut vb) = ([0f32; BLOCK], [0f32; BLOCK]);
    for (b, (p, g)) in param.chunks_mut(BLOCK).zip(grad.chunks(BLOCK)).enumerate() {
        let (n, at) = (p.len(), b * BLOCK);
        let (mc, vc) = (&mut m_codes[at..at + n], &mut v_codes[at..at + n]);
        dequantize_block(Code::Signed, mc, m_scales[b], &mut mb[..n]);
        dequantize_block(Code::Unsigned, vc, v_scales[b], &mut vb[..n]);
        update_slice(s, p, g, &mut mb[..n], &mut vb[..n]);
        m_scales[b] = quantize_block(Code::Signed, &mb[..n], mc);
        v_scales[b] = quantize_block(Code::Unsigned, &vb[..n], vc);
    }
}

impl Optimizer for AdamW8bit {
    step_counter!("adamw8bit");

    host_updates!();

    fn state_bytes(&self) -> usize {
        self.moments.iter().map(Moments::bytes).sum()
    }

    fn state(&self) -> Result<OptimizerState> {
        let (mut buffers, mut quantized) = (BTreeMap::new(), BTreeMap::new());
        for (i, moments) in self.moments.iter().enumerate() {
            match moments {
                Moments::Full { m, v } => {
                    buffers.insert(format!("exp_avg.{i}"), m.clone());
                    buffers.insert(format!("exp_avg_sq.{i}"), v.clone());
                }
                Moments::Quantized { m, v } => {
                    quantized.insert(format!("exp_avg.{i}.codes"), m.codes.clone());
                    quantized.insert(format!("exp_avg_sq.{i}.codes"), v.codes.clone());
                    buffers.insert(format!("exp_avg.{i}.scales"), m.scales.clone());
                    buffers.insert(format!("exp_avg_sq.{i}.scales"), v.scales.clone());
                }
            }
        }
        Ok(OptimizerState { kind: self.name().into(), step: self.step, buffers, quantized })
    }

    fn config(&self) -> Option<super::OptimizerConfig> {
        Some(super::OptimizerConfig::AdamW8bit(self.config))
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.check_kind(self.name())?;
        let mut loaded = Vec::with_capacity(self.moments.len());
        for (i, cur) in self.moments.iter().enumerate() {
            let n = cur.len();
            loaded.push(match cur {
                Moments::Full { .. } => Moments::Full {
                    m: state.buffer(&format!("exp_avg.{i}"), n)?.to_vec(),
                    v: state.buffer(&format!("exp_avg_sq.{i}"), n)?.to_vec(),
                },
                Moments::Quantized { .. } => {
                    let blocks = n.div_ceil(BLOCK);
                    let q = |name: &str| -> Result<Quantized> {
                        Ok(Quantized {
                            codes: state.bytes(&format!("{name}.{i}.codes"), n)?.to_vec(),
                            scales: state.buffer(&format!("{name}.{i}.scales"), blocks)?.to_vec(),
                        })
                    };
                    Moments::Quantized { m: q("exp_avg")?, v: q("exp_avg_sq")? }
                }
            });
        }
        self.moments = loaded;
        self.step = state.step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamW;

    fn grads(n: usize, step: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7 + step * 13) % 23) as f32 - 11.0) * 1e-3 * (1.0 + (i % 5) as f32)).collect()
    }

    #[test]
    fn small_parameters_keep_32_bit_state_and_step_exactly_like_adamw() -> Result<()> {
        let sizes = [100, MIN_QUANTIZED];
        let mut a8 = AdamW8bit::new(AdamWConfig::default(), &sizes)?;
        let mut a32 = AdamW::new(AdamWConfig::default(), &sizes)?;
        let (mut p8, mut p32) = (vec![0.5f32; 100], vec![0.5f32; 100]);
        for step in 0..5 {
            a8.begin_step();
            a32.begin_step();
            a8.update(0, &mut p8, &grads(100, step), 1e-2, true)?;
            a32.update(0, &mut p32, &grads(100, step), 1e-2, true)?;
        }
        assert_eq!(p8, p32, "a small parameter's update must be AdamW's, bit for bit");
        assert_eq!(a8.state_bytes(), 8 * 100 + 2 * (MIN_QUANTIZED + 4 * (MIN_QUANTIZED / BLOCK)));
        assert_eq!(a8.state_bytes(), AdamW8bit::state_bytes_for(&sizes));
        Ok(())
    }

    #[test]
    fn a_shard_of_a_large_parameter_stays_8_bit_however_small() -> Result<()> {
        // Two ranks' halves of a 6000-element matrix and a whole 100-element bias.
        let pieces = [(3000, 6000), (100, 100)];
        let a8 = AdamW8bit::for_pieces(AdamWConfig::default(), &pieces)?;
        assert_eq!(a8.state_bytes(), 2 * (3000 + 4 * 2) + 8 * 100);
        assert_eq!(a8.state_bytes(), AdamW8bit::state_bytes_for_pieces(&pieces));
        let by_length = AdamW8bit::new(AdamWConfig::default(), &[3000, 100])?;
        assert_eq!(by_length.state_bytes(), 8 * 3100, "judged by its own length, the slice would be 32-bit");
        assert!(AdamW8bit::for_pieces(AdamWConfig::default(), &[(10, 5)]).is_err());
        Ok(())
    }

    #[test]
    fn quantized_moments_follow_32_bit_adamw_closely() -> Result<()> {
        let n = 3 * BLOCK + 17 + MIN_QUANTIZED;
        let mut a8 = AdamW8bit::new(AdamWConfig::default(), &[n])?;
        let mut a32 = AdamW::new(AdamWConfig::default(), &[n])?;
        let init: Vec<f32> = (0..n).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
        let (mut p8, mut p32) = (init.clone(), init.clone());
        for step in 0..20 {
            a8.begin_step();
            a32.begin_step();
            a8.update(0, &mut p8, &grads(n, step), 1e-2, true)?;
            a32.update(0, &mut p32, &grads(n, step), 1e-2, true)?;
        }
        // Each step moves a parameter by about lr; after 20 steps the 8-bit trajectory stays
        // within a few percent of the total movement.
        let moved = p32.iter().zip(&init).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let diff = p8.iter().zip(&p32).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-2, "{moved}");
        assert!(diff < 0.05 * moved, "8-bit differs by {diff} after moving {moved}");
        Ok(())
    }

    #[test]
    fn state_round_trips_exactly_and_a_wrong_state_changes_nothing() -> Result<()> {
        let sizes = [10, MIN_QUANTIZED + 5];
        let mut a = AdamW8bit::new(AdamWConfig::default(), &sizes)?;
        let mut p: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![1.0; n]).collect();
        for step in 0..3 {
            a.begin_step();
            for (i, p) in p.iter_mut().enumerate() {
                a.update(i, p, &grads(sizes[i], step), 1e-2, true)?;
            }
        }
        let state = a.state()?;
        assert!(state.quantized.contains_key("exp_avg.1.codes") && state.buffers.contains_key("exp_avg.0"));
        let mut b = AdamW8bit::new(AdamWConfig::default(), &sizes)?;
        b.load_state(&state)?;
        assert_eq!(b.state()?, state);
        assert_eq!(b.step_count(), 3);
        let mut torn = state.clone();
        torn.quantized.insert("exp_avg_sq.1.codes".into(), vec![0; 3]);
        let mut c = AdamW8bit::new(AdamWConfig::default(), &sizes)?;
        let before = c.state()?;
        assert!(matches!(c.load_state(&torn), Err(Error::StateMismatch { .. })));
        assert_eq!(c.state()?, before, "a failed load must change nothing");
        let other = AdamW::new(AdamWConfig::default(), &sizes)?.state()?;
        assert!(c.load_state(&other).is_err());
        Ok(())
    }
}
