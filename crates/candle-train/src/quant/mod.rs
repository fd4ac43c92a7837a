//! A quantized frozen base for QLoRA: affine weights held as NF4 (bitsandbytes' format, with
//! double quantization, [`nf4`]) or as GGML blocks (`Q4_0`, `Q4_1`, `Q8_0`, ... as candle's
//! [`QTensor`] holds them, quantized here or taken straight from a GGUF file), never as a dense
//! matrix.
//!
//! [`quantized_linear`] computes `x Wᵀ` by dequantizing `W` a chunk of output rows at a time
//! (at most [`CHUNK_ELEMENTS`] F32 values live at once) and multiplying each chunk; its backward
//! computes the input gradient `g W` the same way, chunk by chunk, and no gradient for `W`
//! (which is not a tensor of the graph at all). Every quantized format is blocked along the input
//! dimension (NF4's 64-element blocks run along the flattened `[out, in]` matrix, so a chunk of
//! rows is a range of elements), so a chunk of rows never needs a row outside it.
//!
//! The blocks live on the weight's device (training state lives on the device; the host sees
//! only what the user offloads), and each chunk is dequantized there:
//!
//! - NF4: the packed codes and the absmax codes are `U8` tensors, the absmax scales and the
//!   offset `F32` tensors. The portable path ([`QuantizedWeight::dequantize_rows_portable`],
//!   what CUDA and Metal run) is candle tensor ops only: the packed bytes index a `[256, 2]`
//!   table of their two nibbles' code values (no bit operations: candle has none), the
//!   absmaxes are `map[code] * scale + offset` over bitsandbytes' dynamic map, and the two are
//!   multiplied block by block; every F32 rounding is the host loop's, so the values are the
//!   same bits (tested over odd shapes, short last blocks, two absmax groups and every chunk
//!   boundary). Its temporaries peak at about 2.5 times the chunk's F32 bytes (the U32 byte
//!   indices, the code values and their product). On the CPU the same tensors are read by the host loop instead
//!   (`nf4::dequantize_parts`): on a 576 x 1536 SmolLM2 weight it took 1.2 ms against the
//!   tensor ops' 2.2 ms (BENCHMARKS.md section 18).
//! - GGML types: one candle [`QTensor`] per chunk of rows on the device, dequantized by candle
//!   where it lives (its CUDA/Metal kernels for `Q4_0` ... `Q8_K`; candle's CUDA backend
//!   dequantizes `Q8_1` on the host, a type no GGUF weight uses). A GGUF file's unquantized
//!   `F32`/`F16`/`BF16` weights are held as a plain tensor of that dtype (candle's CUDA
//!   `QTensor` would dequantize those on the host).
//!
//! Quantizing (NF4, or GGML from a dense weight) runs on the host at load time, one weight at a
//! time, and the blocks are then copied to the device. What ran where: the CPU path and the
//! portable tensor-op path are tested on the CPU; the CUDA build compiles (`scripts/cuda-env.sh
//! cargo clippy --features nccl`), but nothing of this module has run on a GPU yet.
//!
//! Several in-process ranks (ZeRO, `candle_shard::driver::fit_in_process`) share one base: a
//! quantized [`crate::Llama`]'s snapshot holds the same `Arc<QuantizedWeight>`s, which are
//! immutable.

pub mod nf4;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle::quantized::{GgmlDType, QStorage, QTensor};
use candle::{CpuStorage, DType, Device, Result, Storage, Tensor};
use serde::{Deserialize, Serialize};

pub use nf4::Nf4Tensor;
use nf4::{ABSMAX_GROUP, NF4_BLOCK};

use crate::layers::custom_grad::custom1;

/// The most F32 values of a weight dequantized at once by [`quantized_linear`] (512 KiB): the
/// chunk of output rows is `CHUNK_ELEMENTS / in_features` rows (at least one).
pub const CHUNK_ELEMENTS: usize = 1 << 17;

/// How the frozen base's affine layers are held under QLoRA (`--quantize-base`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BaseQuantization {
    /// NF4, blocks of 64, double-quantized absmaxes (bitsandbytes' QLoRA format).
    #[serde(rename = "nf4")]
    Nf4,
    /// GGML `Q4_0` (blocks of 32: an F16 scale and 4-bit values), quantized by candle.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// GGML `Q4_1` (blocks of 32: F16 scale and minimum, 4-bit values), quantized by candle.
    #[serde(rename = "q4_1")]
    Q4_1,
    /// GGML `Q8_0` (blocks of 32: an F16 scale and 8-bit values), quantized by candle.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// A GGUF file's own blocks, whatever their type, taken as they are (no dequantized copy).
    #[serde(rename = "gguf")]
    Gguf,
}

impl BaseQuantization {
    /// Every mode, in the order the CLI lists them.
    pub const ALL: [Self; 5] = [Self::Nf4, Self::Q4_0, Self::Q4_1, Self::Q8_0, Self::Gguf];

    /// The name the CLI and the configs use (`nf4`, `q4_0`, `q4_1`, `q8_0`, `gguf`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q8_0 => "q8_0",
            Self::Gguf => "gguf",
        }
    }

    /// The GGML block type a dense weight is quantized to (`None` for NF4 and for a file's own
    /// blocks).
    pub fn ggml_dtype(self) -> Option<GgmlDType> {
        match self {
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::Q4_1 => Some(GgmlDType::Q4_1),
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Nf4 | Self::Gguf => None,
        }
    }

    /// Quantizes the dense weight `[out, in]` named `name` (NF4 or a GGML type; a file's own
    /// blocks are taken with [`QuantizedWeight::from_qtensor`] instead).
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for [`BaseQuantization::Gguf`] (there is no file) or an
    /// input dimension that is not a multiple of the GGML block; a tensor error.
    pub fn quantize(self, name: &str, weight: &Tensor) -> crate::Result<QuantizedWeight> {
        match self {
            Self::Nf4 => Ok(QuantizedWeight::nf4(name, weight)?),
            Self::Gguf => Err(crate::Error::config(
                "quantize_base",
                format!("`gguf` keeps a GGUF file's blocks, but `{name}` is a dense tensor"),
            )),
            other => {
                let dtype = other.ggml_dtype().unwrap_or(GgmlDType::Q8_0);
                QuantizedWeight::ggml(name, weight, dtype)
            }
        }
    }
}

impl fmt::Display for BaseQuantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BaseQuantization {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        Self::ALL.into_iter().find(|q| q.name() == s.to_ascii_lowercase()).ok_or_else(|| {
            crate::Error::config(
                "quantize_base",
                format!("`{s}` is not one of {}", Self::ALL.map(Self::name).join(", ")),
            )
        })
    }
}

/// The NF4 code book as pairs: row `b` is the code values of byte `b`'s high and low nibbles
/// (`[256, 2]`), so that one `index_select` over the packed bytes gives every element's code
/// value without bit operations (candle has none).
fn nf4_pairs() -> Vec<f32> {
    (0..256usize).flat_map(|b| [nf4::NF4_CODE[b >> 4], nf4::NF4_CODE[b & 0x0f]]).collect()
}

/// The NF4 pair table and the 256-value dynamic map on `device`: made once per device and
/// shared by every NF4 weight there (3 KiB; not counted by [`QuantizedWeight::storage_bytes`]).
fn nf4_tables(device: &Device) -> Result<(Tensor, Tensor)> {
    type Tables = Vec<(Device, Tensor, Tensor)>;
    static TABLES: std::sync::Mutex<Tables> = std::sync::Mutex::new(Vec::new());
    // A panic elsewhere cannot leave the list half-written (a push is the only change).
    let mut tables = TABLES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, pairs, map)) = tables.iter().find(|(d, _, _)| d.same_device(device)) {
        return Ok((pairs.clone(), map.clone()));
    }
    let pairs = Tensor::from_vec(nf4_pairs(), (256, 2), device)?;
    let map = Tensor::from_slice(&nf4::dynamic_map(), 256, device)?;
    tables.push((device.clone(), pairs.clone(), map.clone()));
    Ok((pairs, map))
}

/// NF4 blocks as tensors on the weight's device (the parts of an [`Nf4Tensor`]).
#[derive(Debug)]
struct Nf4Blocks {
    elements: usize,
    /// `U8 [ceil(n / 2)]`: two 4-bit codes a byte, the first in the high nibble.
    packed: Tensor,
    /// `U8 [ceil(n / 64)]`: each block's double-quantized absmax code.
    absmax_codes: Tensor,
    /// `F32 [ceil(blocks / 256)]`: each group's absmax scale.
    absmax_scales: Tensor,
    /// `F32 [1]`: the absmaxes' mean.
    offset: Tensor,
    /// [`nf4_tables`] for the device (shared, not owned).
    pairs: Tensor,
    map: Tensor,
}

/// A vector in memory of exactly its length (the counting allocator then sees the bytes
/// [`QuantizedWeight::storage_bytes`] reports).
fn exact<T>(mut v: Vec<T>) -> Vec<T> {
    v.shrink_to_fit();
    v
}

impl Nf4Blocks {
    fn new(t: &Nf4Tensor, device: &Device) -> Result<Self> {
        let (pairs, map) = nf4_tables(device)?;
        Ok(Self {
            elements: t.elem_count(),
            packed: Tensor::from_vec(exact(t.packed().to_vec()), t.packed().len(), device)?,
            absmax_codes: Tensor::from_vec(exact(t.absmax_codes().to_vec()), t.absmax_codes().len(), device)?,
            absmax_scales: Tensor::from_vec(
                exact(t.absmax_scales().to_vec()),
                t.absmax_scales().len(),
                device,
            )?,
            offset: Tensor::from_vec(vec![t.offset()], 1, device)?,
            pairs,
            map,
        })
    }

    fn storage_bytes(&self) -> usize {
        self.packed.elem_count() + self.absmax_codes.elem_count() + 4 * self.absmax_scales.elem_count() + 4
    }

    fn to_host(&self, dims: &[usize]) -> Result<Nf4Tensor> {
        let offset = self.offset.to_vec1::<f32>()?;
        Nf4Tensor::from_parts(
            dims,
            self.packed.to_vec1()?,
            self.absmax_codes.to_vec1()?,
            self.absmax_scales.to_vec1()?,
            offset.first().copied().unwrap_or(0.0),
        )
    }

    /// Elements `start .. start + len` (flattened) dequantized to F32 on the blocks' device:
    /// on the CPU by the host loop over the tensors' bytes ([`nf4::dequantize_parts`], measured
    /// faster there, BENCHMARKS.md section 18), elsewhere by [`Nf4Blocks::dequantize_range_portable`].
    fn dequantize_range(&self, start: usize, len: usize) -> Result<Tensor> {
        if !self.packed.device().is_cpu() {
            return self.dequantize_range_portable(start, len);
        }
        let (packed, codes, scales, offset) = (
            self.packed.storage_and_layout(),
            self.absmax_codes.storage_and_layout(),
            self.absmax_scales.storage_and_layout(),
            self.offset.storage_and_layout(),
        );
        let (Some(p), Some(c), Some(s), Some(o)) = (
            packed.1.contiguous_offsets(),
            codes.1.contiguous_offsets(),
            scales.1.contiguous_offsets(),
            offset.1.contiguous_offsets(),
        ) else {
            candle::bail!("nf4: the blocks are not contiguous tensors");
        };
        if start + len > self.elements {
            candle::bail!("nf4: elements {start}..{} of {}", start + len, self.elements);
        }
        let values = match (&*packed.0, &*codes.0, &*scales.0, &*offset.0) {
            (
                Storage::Cpu(CpuStorage::U8(packed)),
                Storage::Cpu(CpuStorage::U8(codes)),
                Storage::Cpu(CpuStorage::F32(scales)),
                Storage::Cpu(CpuStorage::F32(offset)),
            ) if o.1 == o.0 + 1 => nf4::dequantize_parts(
                &packed[p.0..p.1],
                &codes[c.0..c.1],
                &scales[s.0..s.1],
                offset[o.0],
                start,
                len,
            ),
            _ => candle::bail!("nf4: the blocks are not U8/F32 CPU tensors"),
        };
        Tensor::from_vec(values, len, &Device::Cpu)
    }

    /// Elements `start .. start + len` (flattened) dequantized to F32 on the blocks' device,
    /// with tensor ops only (what runs on CUDA and Metal): the blocks covering the range are
    /// expanded (their packed bytes through the pair table, their absmaxes as
    /// `map[code] * scale + offset`, each product rounded as [`Nf4Tensor::dequantize_range`]
    /// rounds it), multiplied block by block, and narrowed to the range. Bit for bit the host's
    /// values.
    fn dequantize_range_portable(&self, start: usize, len: usize) -> Result<Tensor> {
        let device = self.packed.device();
        if start + len > self.elements {
            candle::bail!("nf4: elements {start}..{} of {}", start + len, self.elements);
        }
        if len == 0 {
            return Tensor::zeros(0, DType::F32, device);
        }
        let end = start + len;
        let (b0, b1) = (start / NF4_BLOCK, (end - 1) / NF4_BLOCK + 1);
        let blocks = b1 - b0;
        let (e0, e1) = (b0 * NF4_BLOCK, (b1 * NF4_BLOCK).min(self.elements));
        // The code value of every element of the blocks (a last odd element's padding nibble
        // dropped, a short last block padded with zeros to 64).
        let (byte0, byte1) = (e0 / 2, e1.div_ceil(2));
        let bytes = self.packed.narrow(0, byte0, byte1 - byte0)?;
        // U32 indices: candle's index_select reads an index equal to the index type's maximum
        // as "none" and gives zeros, so U8 indices would lose byte 0xff and map code 255.
        let bytes = bytes.to_dtype(DType::U32)?;
        let mut codes = self.pairs.index_select(&bytes, 0)?.flatten_all()?.narrow(0, 0, e1 - e0)?;
        if e1 - e0 < blocks * NF4_BLOCK {
            codes = codes.pad_with_zeros(0, 0, blocks * NF4_BLOCK - (e1 - e0))?;
        }
        // Each block's absmax: map[code] * the group's scale + offset (two F32 roundings).
        let (g0, g1) = (b0 / ABSMAX_GROUP, (b1 - 1) / ABSMAX_GROUP + 1);
        let scales = self
            .absmax_scales
            .narrow(0, g0, g1 - g0)?
            .reshape((g1 - g0, 1))?
            .broadcast_as((g1 - g0, ABSMAX_GROUP))?
            .flatten_all()?
            .narrow(0, b0 - g0 * ABSMAX_GROUP, blocks)?;
        let absmax =
            self.map.index_select(&self.absmax_codes.narrow(0, b0, blocks)?.to_dtype(DType::U32)?, 0)?;
        let absmax = (absmax * scales)?.broadcast_add(&self.offset)?;
        let values = codes.reshape((blocks, NF4_BLOCK))?.broadcast_mul(&absmax.reshape((blocks, 1))?)?;
        let values = values.flatten_all()?;
        if start == e0 && len == values.elem_count() {
            Ok(values)
        } else {
            values.narrow(0, start - e0, len)?.contiguous()
        }
    }

    fn to_device(&self, device: &Device) -> Result<Self> {
        let (pairs, map) = nf4_tables(device)?;
        Ok(Self {
            elements: self.elements,
            packed: self.packed.to_device(device)?,
            absmax_codes: self.absmax_codes.to_device(device)?,
            absmax_scales: self.absmax_scales.to_device(device)?,
            offset: self.offset.to_device(device)?,
            pairs,
            map,
        })
    }
}

#[derive(Debug)]
enum Blocks {
    Nf4(Nf4Blocks),
    /// GGML blocks as candle's [`QTensor`]s on the weight's device, one per chunk of
    /// `chunk_rows` output rows (chunk `k` holds rows `k * chunk_rows ..`), each dequantized by
    /// candle where it lives (CUDA/Metal kernels, or the CPU).
    Ggml {
        dtype: GgmlDType,
        chunks: Vec<QTensor>,
    },
    /// A GGUF file's unquantized `F32`/`F16`/`BF16` weight: a plain tensor of that dtype on the
    /// device (candle's CUDA `QTensor` would dequantize these on the host).
    Float {
        dtype: GgmlDType,
        tensor: Tensor,
    },
}

/// A frozen weight `[out_features, in_features]` (`nn.Linear`'s layout) held quantized, its
/// blocks on one device (see the module docs).
#[derive(Debug)]
pub struct QuantizedWeight {
    name: String,
    out_features: usize,
    in_features: usize,
    chunk_rows: usize,
    blocks: Blocks,
}

fn default_chunk_rows(in_features: usize) -> usize {
    (CHUNK_ELEMENTS / in_features.max(1)).max(1)
}

/// `bytes` (whole rows of `row_bytes`) as one [`QTensor`] of `dtype` per `chunk_rows` rows on
/// `device`.
fn ggml_chunks(
    name: &str,
    bytes: &[u8],
    (rows, in_features): (usize, usize),
    row_bytes: usize,
    chunk_rows: usize,
    dtype: GgmlDType,
    device: &Device,
) -> Result<Vec<QTensor>> {
    // candle views the bytes as blocks (F16 fields: 2-byte alignment; Q8_K: 4). The allocator
    // aligns every buffer to 16 bytes, and chunks start at whole rows of whole blocks; checked
    // rather than assumed.
    if bytes.as_ptr() as usize % 8 != 0 {
        candle::bail!("`{name}`: block buffer is not 8-byte aligned");
    }
    (0..rows)
        .step_by(chunk_rows.max(1))
        .map(|start| {
            let len = chunk_rows.min(rows - start);
            let slice = &bytes[start * row_bytes..(start + len) * row_bytes];
            let storage = QStorage::from_data(Cow::Borrowed(slice), device, dtype)?;
            QTensor::new(storage, (len, in_features))
        })
        .collect()
}

impl QuantizedWeight {
    /// `weight` (`[out, in]`) in NF4 with double quantization ([`nf4`]), its blocks on
    /// `weight`'s device (quantized on the host, then copied there).
    ///
    /// # Errors
    /// For a weight that is not a matrix or holds a non-finite value.
    pub fn nf4(name: &str, weight: &Tensor) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let values = weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let host = Nf4Tensor::quantize(&values, &[out_features, in_features])
            .map_err(|e| candle::Error::Msg(format!("`{name}`: {e}")))?;
        drop(values);
        Self::from_nf4(name, &host, weight.device())
    }

    /// The NF4 tensor `t` (`[out, in]`) as a weight whose blocks are on `device`.
    ///
    /// # Errors
    /// For a tensor that is not a matrix; a tensor error.
    pub fn from_nf4(name: &str, t: &Nf4Tensor, device: &Device) -> Result<Self> {
        let &[out_features, in_features] = t.dims() else {
            candle::bail!("`{name}`: an NF4 weight must be a matrix, not {:?}", t.dims());
        };
        Ok(Self {
            name: name.to_string(),
            out_features,
            in_features,
            chunk_rows: default_chunk_rows(in_features),
            blocks: Blocks::Nf4(Nf4Blocks::new(t, device)?),
        })
    }

    /// `weight` (`[out, in]`) quantized by candle to the GGML block type `dtype`, its blocks on
    /// `weight`'s device (quantized on the host, then copied there).
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] when the input dimension is not a multiple of the
    /// type's block (naming the weight); a tensor error.
    pub fn ggml(name: &str, weight: &Tensor, dtype: GgmlDType) -> crate::Result<Self> {
        let (_, in_features) = weight.dims2()?;
        if in_features % dtype.block_size() != 0 {
            return Err(crate::Error::config(
                "quantize_base",
                format!(
                    "`{name}`: {in_features} input features are not a multiple of {dtype:?}'s block of {}",
                    dtype.block_size()
                ),
            ));
        }
        let q = QTensor::quantize(&weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, dtype)?;
        Ok(Self::from_qtensor(name, &q, None)?.to_device(weight.device())?)
    }

    /// The blocks of `q` (`[out, in]`, any GGML type, such as a tensor read from a GGUF file),
    /// copied as they are onto `q`'s device ([`QuantizedWeight::to_device`] moves them); with
    /// `rows`, output row `i` is `q`'s row `rows[i]` (a permutation of whole rows, such as
    /// llama.cpp's rotary layout undone: legal because the blocks run along the input
    /// dimension). `F32`/`F16`/`BF16` "blocks" are held as a plain tensor of that dtype.
    ///
    /// # Errors
    /// For a tensor that is not a matrix, whose rows are not whole blocks, a `rows` that is not
    /// a list of row indices of the right length; when its blocks cannot be read.
    pub fn from_qtensor(name: &str, q: &QTensor, rows: Option<&[usize]>) -> crate::Result<Self> {
        let (out_features, in_features) = q.shape().dims2()?;
        let dtype = q.dtype();
        if in_features % dtype.block_size() != 0 {
            return Err(candle::Error::Msg(format!(
                "`{name}`: rows of {in_features} are not whole {dtype:?} blocks"
            ))
            .into());
        }
        let row_bytes = in_features / dtype.block_size() * dtype.type_size();
        let data = q.data()?;
        if data.len() != out_features * row_bytes {
            return Err(candle::Error::Msg(format!(
                "`{name}`: {} bytes of blocks for {out_features} rows of {row_bytes} bytes",
                data.len()
            ))
            .into());
        }
        let bytes = match rows {
            None => data,
            Some(rows) => {
                if rows.len() != out_features || rows.iter().any(|&r| r >= out_features) {
                    return Err(candle::Error::Msg(format!(
                        "`{name}`: the row order does not list {out_features} rows"
                    ))
                    .into());
                }
                let mut bytes = Vec::with_capacity(data.len());
                for &r in rows {
                    bytes.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
                }
                Cow::Owned(bytes)
            }
        };
        let chunk_rows = default_chunk_rows(in_features);
        Ok(Self {
            name: name.to_string(),
            out_features,
            in_features,
            chunk_rows,
            blocks: Self::ggml_blocks(
                name,
                &bytes,
                (out_features, in_features),
                chunk_rows,
                dtype,
                &q.device(),
            )?,
        })
    }

    fn ggml_blocks(
        name: &str,
        bytes: &[u8],
        dims: (usize, usize),
        chunk_rows: usize,
        dtype: GgmlDType,
        device: &Device,
    ) -> Result<Blocks> {
        let row_bytes = dims.1 / dtype.block_size() * dtype.type_size();
        let float = match dtype {
            GgmlDType::F32 => Some(DType::F32),
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        };
        if let Some(float) = float {
            // Exact: F16 and BF16 widen to F32 exactly, and narrow back to the same bits.
            // One chunk of every row (none for a weight of no rows).
            let whole = ggml_chunks(name, bytes, dims, row_bytes, dims.0, dtype, &Device::Cpu)?;
            let tensor = match whole.first() {
                Some(q) => q.dequantize(&Device::Cpu)?,
                None => Tensor::zeros(dims, DType::F32, &Device::Cpu)?,
            };
            let tensor = tensor.to_dtype(float)?.to_device(device)?;
            return Ok(Blocks::Float { dtype, tensor });
        }
        let chunks = ggml_chunks(name, bytes, dims, row_bytes, chunk_rows, dtype, device)?;
        Ok(Blocks::Ggml { dtype, chunks })
    }

    /// The same weight with its blocks on `device` (itself when they are there already).
    ///
    /// # Errors
    /// When the blocks cannot be read back or copied.
    pub fn to_device(self, device: &Device) -> Result<Self> {
        if self.device().same_device(device) {
            return Ok(self);
        }
        let blocks = match &self.blocks {
            Blocks::Nf4(b) => Blocks::Nf4(b.to_device(device)?),
            Blocks::Float { dtype, tensor } => {
                Blocks::Float { dtype: *dtype, tensor: tensor.to_device(device)? }
            }
            Blocks::Ggml { dtype, chunks } => Blocks::Ggml {
                dtype: *dtype,
                chunks: chunks
                    .iter()
                    .map(|q| {
                        let data = q.data()?;
                        // candle views the bytes as blocks (and asserts their alignment).
                        if data.as_ptr() as usize % 8 != 0 {
                            candle::bail!("`{}`: block buffer is not 8-byte aligned", self.name);
                        }
                        QTensor::new(QStorage::from_data(data, device, *dtype)?, q.shape().clone())
                    })
                    .collect::<Result<_>>()?,
            },
        };
        Ok(Self { blocks, ..self })
    }

    /// The same weight, dequantized `rows` output rows at a time (by default
    /// [`CHUNK_ELEMENTS`] / `in_features`). GGML blocks are held one [`QTensor`] per chunk, so
    /// they are regrouped (read back and copied again).
    ///
    /// # Errors
    /// When GGML blocks cannot be read back or copied.
    pub fn with_chunk_rows(mut self, rows: usize) -> Result<Self> {
        let rows = rows.max(1);
        if let Blocks::Ggml { dtype, chunks } = &self.blocks {
            let mut bytes = Vec::with_capacity(self.storage_bytes());
            for q in chunks {
                bytes.extend_from_slice(&q.data()?);
            }
            let dims = (self.out_features, self.in_features);
            let device = self.device();
            self.blocks = Self::ggml_blocks(&self.name, &bytes, dims, rows, *dtype, &device)?;
        }
        self.chunk_rows = rows;
        Ok(self)
    }

    /// The weight's name (`model.layers.0.self_attn.q_proj.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// The device the blocks live on (where they are dequantized).
    pub fn device(&self) -> Device {
        match &self.blocks {
            Blocks::Nf4(b) => b.packed.device().clone(),
            Blocks::Float { tensor, .. } => tensor.device().clone(),
            Blocks::Ggml { chunks, .. } => chunks.first().map_or(Device::Cpu, QTensor::device),
        }
    }

    /// The format: `nf4` or the GGML type's name (`q4_1`, `q8_0`, `f16`, ...).
    pub fn format(&self) -> String {
        match &self.blocks {
            Blocks::Nf4(_) => "nf4".into(),
            Blocks::Ggml { dtype, .. } | Blocks::Float { dtype, .. } => {
                format!("{dtype:?}").to_ascii_lowercase()
            }
        }
    }

    /// The NF4 blocks copied back into host memory (the reference the tests dequantize on the
    /// host), when the weight is NF4.
    ///
    /// # Errors
    /// When the blocks cannot be read back.
    pub fn to_nf4(&self) -> Result<Option<Nf4Tensor>> {
        match &self.blocks {
            Blocks::Nf4(b) => Ok(Some(b.to_host(&[self.out_features, self.in_features])?)),
            Blocks::Ggml { .. } | Blocks::Float { .. } => Ok(None),
        }
    }

    /// Bytes the quantized weight holds: NF4's packed codes, absmax codes, absmax scales and
    /// offset; the GGML blocks (for `F32`/`F16`/`BF16`, the tensor). On CUDA candle pads each
    /// chunk's `QTensor` allocation by 512 values' worth of blocks, which this does not count.
    pub fn storage_bytes(&self) -> usize {
        match &self.blocks {
            Blocks::Nf4(b) => b.storage_bytes(),
            Blocks::Ggml { chunks, .. } => chunks.iter().map(QTensor::storage_size_in_bytes).sum(),
            Blocks::Float { tensor, .. } => tensor.elem_count() * tensor.dtype().size_in_bytes(),
        }
    }

    /// Output rows `start .. start + len` dequantized to F32 (`[len, in]`) where the blocks
    /// live, then moved to `device` (nothing moves when it is theirs).
    ///
    /// # Errors
    /// When the rows are out of range; a tensor error.
    pub fn dequantize_rows(&self, start: usize, len: usize, device: &Device) -> Result<Tensor> {
        if start + len > self.out_features {
            candle::bail!("`{}`: rows {start}..{} of {}", self.name, start + len, self.out_features);
        }
        let t = match &self.blocks {
            Blocks::Nf4(b) => b
                .dequantize_range(start * self.in_features, len * self.in_features)?
                .reshape((len, self.in_features))?,
            Blocks::Float { tensor, .. } => tensor.narrow(0, start, len)?.to_dtype(DType::F32)?,
            Blocks::Ggml { chunks, .. } => {
                let mut parts = Vec::new();
                let first = start / self.chunk_rows;
                for (k, q) in chunks.iter().enumerate().skip(first) {
                    let chunk_start = k * self.chunk_rows;
                    if chunk_start >= start + len {
                        break;
                    }
                    let rows = q.shape().dims()[0];
                    let (from, to) = (start.max(chunk_start), (start + len).min(chunk_start + rows));
                    let values = q.dequantize(&q.device())?;
                    parts.push(match (from - chunk_start, to - from) {
                        (0, n) if n == rows => values,
                        (offset, n) => values.narrow(0, offset, n)?,
                    });
                }
                match parts.len() {
                    0 => Tensor::zeros((0, self.in_features), DType::F32, &self.device())?,
                    1 => parts.remove(0),
                    _ => Tensor::cat(&parts, 0)?,
                }
            }
        };
        t.to_device(device)
    }

    /// Output rows `start .. start + len` dequantized to F32 (`[len, in]`) on the blocks' own
    /// device by the path that runs on every device: for NF4 the tensor ops CUDA and Metal run
    /// (on the CPU [`QuantizedWeight::dequantize_rows`] takes a host loop instead, which gives
    /// the same bits faster); for the other formats the same as `dequantize_rows`. The tests
    /// compare the two.
    ///
    /// # Errors
    /// When the rows are out of range; a tensor error.
    pub fn dequantize_rows_portable(&self, start: usize, len: usize) -> Result<Tensor> {
        match &self.blocks {
            Blocks::Nf4(b) => {
                if start + len > self.out_features {
                    candle::bail!("`{}`: rows {start}..{} of {}", self.name, start + len, self.out_features);
                }
                b.dequantize_range_portable(start * self.in_features, len * self.in_features)?
                    .reshape((len, self.in_features))
            }
            _ => self.dequantize_rows(start, len, &self.device()),
        }
    }

    /// The whole weight dequantized to F32 (`[out, in]`): the reference the tests compare with,
    /// never used by training.
    ///
    /// # Errors
    /// On a tensor error.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        self.dequantize_rows(0, self.out_features, device)
    }

    /// The chunks of output rows the weight is dequantized in: `(first row, rows)`.
    pub fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.out_features)
            .step_by(self.chunk_rows)
            .map(|start| (start, self.chunk_rows.min(self.out_features - start)))
    }
}

/// The dtype the chunks multiply in: F32 for a half-precision input on the CPU, else the
/// input's. The dequantized chunk is F32; rounding it to BF16 (as bitsandbytes dequantizes to
/// the compute dtype) would cost Candle's slow CPU conversion over every weight value at every
/// use and lose bits of the file's values (a Q4_1 value `d q + m` with F16 `d`, `m` needs more
/// than BF16's 8 bits). BENCHMARKS.md section 17: with BF16 chunks a SmolLM2-135M QLoRA step
/// took about 1.4x LoRA's, this way about 1.07x (single runs on a loaded 2-core machine).
fn compute_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() && matches!(dtype, DType::BF16 | DType::F16) {
        DType::F32
    } else {
        dtype
    }
}

/// `x Wᵀ (+ b)` over the last dimension of `x` for a quantized `W` (`[out, in]`), computed a
/// chunk of output rows at a time (in F32 for a half-precision input on the CPU, see
/// `compute_dtype`; the result in `x`'s dtype). Its backward gives `x` the gradient `g W`
/// (chunk by chunk, summed in F32 for half types) and nothing else: the weight and the bias
/// are constants.
///
/// # Errors
/// On a shape mismatch or a tensor error.
pub fn quantized_linear(x: &Tensor, weight: &Arc<QuantizedWeight>, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((&in_features, lead)) = dims.split_last() else {
        candle::bail!("quantized linear: input must have at least one dimension");
    };
    let (out_features, w_in) = weight.dims();
    if in_features != w_in {
        candle::bail!("`{}`: input of {in_features} features, weight takes {w_in}", weight.name());
    }
    let rows: usize = lead.iter().product();
    let (device, dtype) = (x.device().clone(), x.dtype());
    let compute = compute_dtype(dtype, &device);
    let x2 = x.detach().reshape((rows, in_features))?.to_dtype(compute)?;
    let mut parts = Vec::new();
    for (start, len) in weight.chunks() {
        let w = weight.dequantize_rows(start, len, &device)?.to_dtype(compute)?;
        parts.push(x2.matmul(&w.t()?)?.to_dtype(dtype)?);
    }
    drop(x2);
    let mut y = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 1)? };
    drop(parts);
    if let Some(b) = bias {
        y = y.broadcast_add(&b.detach())?;
    }
    let mut out_dims = lead.to_vec();
    out_dims.push(out_features);
    let value = y.reshape(out_dims)?;
    let weight = Arc::clone(weight);
    custom1("quantized_linear", x, value, move |x, _, g| {
        let compute = compute_dtype(g.dtype(), g.device());
        let acc_dtype = crate::device::reduction_dtype(g.dtype());
        let g2 = g.reshape((rows, out_features))?.to_dtype(compute)?;
        let mut grad: Option<Tensor> = None;
        for (start, len) in weight.chunks() {
            let w = weight.dequantize_rows(start, len, g.device())?.to_dtype(compute)?;
            let part = g2.narrow(1, start, len)?.contiguous()?.matmul(&w)?.to_dtype(acc_dtype)?;
            grad = Some(match grad {
                Some(sum) => (sum + part)?,
                None => part,
            });
        }
        let grad = match grad {
            Some(g) => g,
            None => Tensor::zeros((rows, in_features), acc_dtype, g.device())?,
        };
        Ok(Some(grad.to_dtype(x.dtype())?.reshape(x.shape())?))
    })
}
