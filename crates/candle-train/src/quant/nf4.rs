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
// The digits bitsandbytes writes (its table is F32 of these Python floats); each rounds to the
// F32 value bitsandbytes uses.
#[allow(clippy::excessive_precision)]
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
/// `torch.linspace(0.1, 1, 2^i + 1)` times `10^(i - 6)`, with both signs, then `0` and `1`.
/// Index 127 is zero.
///
/// The values are torch's F32 results as bit patterns (printed by
/// `scripts/reference/nf4_double_quant.py`, torch 2.x on x86-64): torch's CPU `linspace` is
/// vectorised, and 42 of the 256 values differ in the last bit from a scalar
/// `start + step * i`, so the table is copied rather than recomputed.
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_MAP
}

const DYNAMIC_MAP: [f32; 256] = {
    let mut map = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        map[i] = f32::from_bits(DYNAMIC_MAP_BITS[i]);
        i += 1;
    }
    map
};

const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

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

/// Elements `start .. start + len` of the NF4 tensor whose parts these are, dequantized to F32
/// one by one (`NF4_CODE[code] * (map[absmax code] * scale + offset)`). The range must lie in
/// the tensor (`2 * packed.len()` elements at most).
pub(crate) fn dequantize_parts(
    packed: &[u8],
    absmax_codes: &[u8],
    absmax_scales: &[f32],
    offset: f32,
    start: usize,
    len: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    let mut block = usize::MAX;
    let mut absmax = 0f32;
    for i in start..start + len {
        if i / NF4_BLOCK != block {
            block = i / NF4_BLOCK;
            let q = absmax_codes[block] as usize;
            absmax = DYNAMIC_MAP[q] * absmax_scales[block / ABSMAX_GROUP] + offset;
        }
        let byte = packed[i / 2];
        let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
        out.push(NF4_CODE[code as usize] * absmax);
    }
    out
}

/// A tensor in NF4 with double-quantized block scales, held in host memory (the format as
/// quantized; [`super::QuantizedWeight`] places its parts on a device).
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
        let (absmax_codes, absmax_scales) = quantize_blockwise(&centred, ABSMAX_GROUP, &DYNAMIC_MAP, 127);
        Ok(Self { dims: dims.to_vec(), packed, absmax_codes, absmax_scales, offset })
    }

    /// A tensor from its stored parts (as [`Nf4Tensor::packed`], [`Nf4Tensor::absmax_codes`],
    /// [`Nf4Tensor::absmax_scales`] and [`Nf4Tensor::offset`] give them), such as blocks read
    /// back from a device.
    ///
    /// # Errors
    /// When a part's length does not fit `dims` (naming the part).
    pub fn from_parts(
        dims: &[usize],
        packed: Vec<u8>,
        absmax_codes: Vec<u8>,
        absmax_scales: Vec<f32>,
        offset: f32,
    ) -> Result<Self> {
        let n: usize = dims.iter().product();
        let blocks = n.div_ceil(NF4_BLOCK);
        for (part, len, want) in [
            ("packed codes", packed.len(), n.div_ceil(2)),
            ("absmax codes", absmax_codes.len(), blocks),
            ("absmax scales", absmax_scales.len(), blocks.div_ceil(ABSMAX_GROUP)),
        ] {
            if len != want {
                candle::bail!("nf4: {len} {part} for shape {dims:?}, which takes {want}");
            }
        }
        Ok(Self { dims: dims.to_vec(), packed, absmax_codes, absmax_scales, offset })
    }

    /// The packed 4-bit codes: two per byte, the first element in the high nibble (a last odd
    /// element's low nibble is 0).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The 8-bit code (an index into [`dynamic_map`]) of each 64-element block's centred absmax.
    pub fn absmax_codes(&self) -> &[u8] {
        &self.absmax_codes
    }

    /// The F32 scale of each group of [`ABSMAX_GROUP`] absmax codes.
    pub fn absmax_scales(&self) -> &[f32] {
        &self.absmax_scales
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
            .map(|(i, &q)| DYNAMIC_MAP[q as usize] * self.absmax_scales[i / ABSMAX_GROUP] + self.offset)
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
        Ok(dequantize_parts(&self.packed, &self.absmax_codes, &self.absmax_scales, self.offset, start, len))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// bitsandbytes' map as torch computes it (`create_dynamic_map()`, values' bits recorded
    /// from torch 2.x by scripts/reference/nf4_double_quant.py's `create_dynamic_map`).
    #[test]
    fn the_dynamic_map_is_bitsandbytes() {
        let map = dynamic_map();
        let bits: Vec<u32> = map.iter().map(|v| v.to_bits()).collect();
        let expected = [
            (0, 0xbf7e_3333u32),
            (1, 0xbf7a_999a),
            (64, 0xbdc9_eb85),
            (126, 0xb513_a3b7),
            (127, 0),
            (128, 0x3513_a3b7),
            (200, 0x3e6f_3333),
            (254, 0x3f7e_3333),
            (255, 0x3f80_0000),
        ];
        for (i, b) in expected {
            assert_eq!(bits[i], b, "map[{i}] = {}", map[i]);
        }
        // Every one of the 256 values: the sum of their bit patterns as torch gives them.
        assert_eq!(bits.iter().map(|&b| u64::from(b)).sum::<u64>(), 535_306_620_548);
    }

    /// One block worked by hand: absmax 2, so each value scaled by 1/2 is an NF4 value or lies
    /// between two; a single block's centred absmax is 0, so the block's scale comes back as
    /// exactly 2 (the offset).
    #[test]
    fn one_block_by_hand() -> Result<()> {
        let mut values: Vec<f32> = (0..64).map(|j| 2.0 * NF4_CODE[j % 16]).collect();
        values[16] = 0.5; // 0.25: between 0.2461 (code 10) and 0.3379 (11), nearer 10
        values[17] = -0.3; // -0.15: between -0.1848 (5) and -0.0911 (6), nearer 5
        values[18] = 1.9; // 0.95: between 0.7230 (14) and 1 (15), nearer 15
        let t = Nf4Tensor::quantize(&values, &[4, 16])?;
        assert_eq!(t.offset(), 2.0);
        assert_eq!(t.block_absmax(), vec![2.0]);
        let codes: Vec<u8> = (0..20).map(|i| t.code(i)).collect();
        let expected = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 10, 5, 15, 3];
        assert_eq!(codes, expected);
        // Packing: the first element in the high nibble (codes 0 and 1: byte 0x01).
        assert_eq!(t.packed[0], 0x01);
        assert_eq!(t.packed[8], 0xa5);
        let back = t.dequantize_range(0, 64)?;
        for j in (0..64).filter(|j| !(16..19).contains(j)) {
            assert_eq!(back[j], values[j], "element {j}");
        }
        assert_eq!(back[16], 2.0 * NF4_CODE[10]);
        assert_eq!(back[17], 2.0 * NF4_CODE[5]);
        assert_eq!(back[18], 2.0);
        Ok(())
    }

    /// Three blocks with absmaxes 1, 2 and 4: offset 7/3, centred absmaxes scaled by their
    /// largest magnitude 5/3 to -0.8, -0.2 and 1, mapped to the dynamic map and back. The
    /// values are bitsandbytes' reference kernels' as scripts/reference/nf4_double_quant.py
    /// computes them with torch.
    #[test]
    fn double_quantization_matches_bitsandbytes() -> Result<()> {
        let mut values: Vec<f32> = (0..192).map(|j| (((j * 37) % 64) as f32 - 31.5) / 31.5).collect();
        values[64..128].iter_mut().for_each(|v| *v *= 2.0);
        values[128..].iter_mut().for_each(|v| *v *= 4.0);
        let t = Nf4Tensor::quantize(&values, &[192])?;
        assert_eq!(t.offset().to_bits(), 0x4015_5555);
        assert_eq!(t.absmax_codes, vec![14, 56, 255]);
        assert_eq!(t.absmax_scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(), vec![0x3fd5_5556]);
        let absmax: Vec<u32> = t.block_absmax().iter().map(|a| a.to_bits()).collect();
        assert_eq!(absmax, vec![0x3f80_d554, 0x3ffe_d554, 0x4080_0000]);
        assert_eq!((0..8).map(|i| t.code(i)).collect::<Vec<_>>(), vec![0, 9, 1, 12, 3, 14, 6, 0]);
        let out = t.dequantize_range(0, 192)?;
        let bits: Vec<u32> = out[..4].iter().map(|v| v.to_bits()).collect();
        assert_eq!(bits, vec![0xbf80_d554, 0x3e25_dd89, 0xbf33_62ba, 0x3ee3_1cc8]);
        assert_eq!(out[130].to_bits(), 0xc032_39b1);
        // A range inside the tensor dequantizes to the same values.
        assert_eq!(t.dequantize_range(60, 10)?, out[60..70].to_vec());
        Ok(())
    }

    #[test]
    fn zeros_and_bad_input() -> Result<()> {
        let t = Nf4Tensor::quantize(&[0.0; 70], &[70])?;
        assert!(t.dequantize_range(0, 70)?.iter().all(|v| *v == 0.0));
        assert!(Nf4Tensor::quantize(&[f32::NAN], &[1]).is_err());
        assert!(Nf4Tensor::quantize(&[1.0, 2.0], &[3]).is_err());
        assert!(t.dequantize_range(60, 11).is_err());
        Ok(())
    }
}
