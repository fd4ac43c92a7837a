//! NF4 with double quantization, as bitsandbytes defines it (`quantize_4bit(quant_type="nf4",
//! blocksize=64, compress_statistics=True)`, the format QLoRA trains over).
//!
//! What this follows (bitsandbytes `functional.py` `quantize_4bit` / `dequantize_4bit`,
//! `create_dynamic_map`, and the reference kernels of `backends/default/ops.py`):
//!
//! - The tensor is flattened and cut into blocks of 64 elements (the last block may be short).
//!   Each block's `absmax` is the largest magnitude in it (F32); each element is scaled by
//!   `1 / absmax` (computed in F32, then multiplied, as the kernels do), clamped to `[-1, 1]` and
//!   mapped to the nearest of the 16 NF4 code values ([`NF4_CODE`]; at an exact midpoint the
//!   lower code, as `argmin` and the CUDA kernel's strict `>` comparisons give). Two codes go in a
//!   byte, the first element in the high nibble.
//! - Double quantization (`compress_statistics=True`): `offset` is the mean of the absmaxes
//!   (F32); the centred absmaxes `absmax - offset` are quantized blockwise with blocksize 256 to 8
//!   bits over bitsandbytes' signed dynamic map ([`dynamic_map`], `create_dynamic_map(signed=True)`,
//!   256 values): each group of 256 keeps its own F32 `absmax2`, its values are scaled by
//!   `1 / absmax2` and mapped to the nearest map value.
//! - Dequantization: `absmax_i = code8[q_i] * absmax2[i / 256] + offset` (F32), then element
//!   `j` is `NF4_CODE[q_j] * absmax[j / 64]` (F32).
//!
//! Where this differs: bitsandbytes' reference kernel computes `0 * (1 / 0)` (NaN) for a block
//! whose values are all zero (and for a group of 256 equal absmaxes, such as a tensor of one
//! block); here such a block gets the code of zero (NF4 index 7, map index 127), which
//! dequantizes to exactly what the block held. The mean `offset` is summed in F64 and rounded
//! to F32 (torch sums F32 pairwise: the last bit may differ; the offset is stored, so the
//! dequantized values follow from what is stored either way).

use candle::{Device, Result, Tensor};

/// The elements per NF4 block (bitsandbytes' default `blocksize=64` for QLoRA).
pub const NF4_BLOCK: usize = 64;

/// The absmaxes per group of the 8-bit double quantization (bitsandbytes' fixed 256).
pub const ABSMAX_GROUP: usize = 256;

/// The 16 NF4 code values (bitsandbytes' `get_4bit_type("nf4")`, QLoRA's normal-float table),
/// indexed by the 4-bit code.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True,
/// max_exponent_bits=7, total_bits=8)`), sorted: for `i` in `0..7`, the midpoints of
/// `torch.linspace(0.1, 1, 2^i + 1)` (F32, torch's two-sided linspace) times `10^(i - 6)`, with
/// both signs, then `0` and `1`. Index 127 is zero.
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7 {
        let steps = (1usize << i) + 1;
        let boundaries = torch_linspace(0.1, 1.0, steps);
        // `10 ** (i - 6)` is a Python float (an int for i = 6), multiplied into the F32 tensor.
        let scale = 10f64.powi(i - 6) as f32;
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// `torch.linspace(start, end, steps)` in F32 as ATen's CPU kernel computes it: the step in
/// F32, the first half counted from `start`, the second half back from `end`.
fn torch_linspace(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 })
        .collect()
}

/// The index of the code value nearest to `x` in the sorted `code` (the lower one at an exact
/// midpoint, as `argmin` gives).
fn nearest(code: &[f32], x: f32) -> u8 {
    let mut best = 0usize;
    let mut best_diff = f32::INFINITY;
    for (i, &c) in code.iter().enumerate() {
        let diff = (x - c).abs();
        if diff < best_diff {
            best = i;
            best_diff = diff;
        }
    }
    best as u8
}

/// Quantizes `values` blockwise over `code` (bitsandbytes' `quantize_blockwise`): the F32
/// absmax per block and the code index of each value. A block of zeros gets `zero_index`.
fn quantize_blockwise(values: &[f32], block: usize, code: &[f32], zero_index: u8) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(values.len());
    let mut absmaxes = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block) {
        let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmaxes.push(absmax);
        if absmax == 0.0 {
            codes.extend(std::iter::repeat_n(zero_index, chunk.len()));
            continue;
        }
        let inverse = 1.0 / absmax;
        codes.extend(chunk.iter().map(|&v| nearest(code, (v * inverse).clamp(-1.0, 1.0))));
    }
    (codes, absmaxes)
}

/// A tensor in NF4 with double-quantized block scales, held in host memory.
#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    dims: Vec<usize>,
    /// Two 4-bit codes per byte, the first element in the high nibble.
    packed: Vec<u8>,
    /// The 8-bit code of each block's centred absmax.
    absmax_codes: Vec<u8>,
    /// The F32 scale of each group of 256 absmax codes.
    absmax_scales: Vec<f32>,
    /// The mean of the absmaxes, added back after dequantizing them.
    offset: f32,
    /// The dynamic map the absmax codes index.
    map: [f32; 256],
}

impl Nf4Tensor {
    /// Quantizes `values` (the tensor of shape `dims`, flattened row-major).
    ///
    /// # Errors
    /// When `dims` does not hold `values.len()` elements, or a value is not finite.
    pub fn quantize(values: &[f32], dims: &[usize]) -> Result<Self> {
        let n: usize = dims.iter().product();
        if n != values.len() {
            candle::bail!("nf4: shape {dims:?} holds {n} elements, given {}", values.len());
        }
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            candle::bail!("nf4: cannot quantize the non-finite value {bad}");
        }
        let (codes, absmax) = quantize_blockwise(values, NF4_BLOCK, &NF4_CODE, 7);
        let mut packed = Vec::with_capacity(n.div_ceil(2));
        for pair in codes.chunks(2) {
            let low = pair.get(1).copied().unwrap_or(0);
            packed.push((pair[0] << 4) | low);
        }
        let offset = if absmax.is_empty() {
            0.0
        } else {
            (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len() as f64) as f32
        };
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let map = dynamic_map();
        let (absmax_codes, absmax_scales) = quantize_blockwise(&centred, ABSMAX_GROUP, &map, 127);
        Ok(Self { dims: dims.to_vec(), packed, absmax_codes, absmax_scales, offset, map })
    }

    /// The shape.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The number of elements.
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// The 4-bit code of element `i`.
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i % 2 == 0 {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// The dequantized absmax of every block (`code8[q] * absmax2 + offset`, F32).
    pub fn block_absmax(&self) -> Vec<f32> {
        self.absmax_codes
            .iter()
            .enumerate()
            .map(|(i, &q)| self.map[q as usize] * self.absmax_scales[i / ABSMAX_GROUP] + self.offset)
            .collect()
    }

    /// The mean of the blocks' absmaxes that double quantization subtracted.
    pub fn offset(&self) -> f32 {
        self.offset
    }

    /// Elements `start .. start + len` (flattened) dequantized to F32.
    ///
    /// # Errors
    /// When the range is out of the tensor.
    pub fn dequantize_range(&self, start: usize, len: usize) -> Result<Vec<f32>> {
        if start + len > self.elem_count() {
            candle::bail!("nf4: elements {start}..{} of {}", start + len, self.elem_count());
        }
        let mut out = Vec::with_capacity(len);
        let mut block = usize::MAX;
        let mut absmax = 0f32;
        for i in start..start + len {
            if i / NF4_BLOCK != block {
                block = i / NF4_BLOCK;
                let q = self.absmax_codes[block] as usize;
                absmax = self.map[q] * self.absmax_scales[block / ABSMAX_GROUP] + self.offset;
            }
            out.push(NF4_CODE[self.code(i) as usize] * absmax);
        }
        Ok(out)
    }

    /// The whole tensor dequantized to F32 on `device`.
    ///
    /// # Errors
    /// On a tensor error.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.dequantize_range(0, self.elem_count())?, self.dims.as_slice(), device)
    }

    /// Bytes held: the packed codes, the absmax codes and scales, and the offset.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax_codes.len() + 4 * self.absmax_scales.len() + 4
    }
}
