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
//! The blocks are held in host memory: on the CPU, where this is measured, that is the device;
//! on CUDA each chunk is dequantized on the host and copied over (correct, slow: no device
//! kernel is written for it).

pub mod nf4;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle::quantized::{GgmlDType, QStorage, QTensor};
use candle::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

pub use nf4::Nf4Tensor;

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

#[derive(Debug)]
enum Blocks {
    Nf4(Nf4Tensor),
    /// Row-major GGML blocks: row `r` is `bytes[r * row_bytes .. (r + 1) * row_bytes]`.
    Ggml {
        dtype: GgmlDType,
        bytes: Vec<u8>,
        row_bytes: usize,
    },
}

/// A frozen weight `[out_features, in_features]` (`nn.Linear`'s layout) held quantized.
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

impl QuantizedWeight {
    /// `weight` (`[out, in]`) in NF4 with double quantization ([`nf4`]).
    ///
    /// # Errors
    /// For a weight that is not a matrix or holds a non-finite value.
    pub fn nf4(name: &str, weight: &Tensor) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let values = weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let blocks = Nf4Tensor::quantize(&values, &[out_features, in_features])
            .map_err(|e| candle::Error::Msg(format!("`{name}`: {e}")))?;
        Ok(Self {
            name: name.to_string(),
            out_features,
            in_features,
            chunk_rows: default_chunk_rows(in_features),
            blocks: Blocks::Nf4(blocks),
        })
    }

    /// `weight` (`[out, in]`) quantized by candle to the GGML block type `dtype`.
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
        Self::from_qtensor(name, &q, None)
    }

    /// The blocks of `q` (`[out, in]`, any GGML type, such as a tensor read from a GGUF file),
    /// copied as they are; with `rows`, output row `i` is `q`'s row `rows[i]` (a permutation of
    /// whole rows, such as llama.cpp's rotary layout undone: legal because the blocks run along
    /// the input dimension).
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
            None => data.to_vec(),
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
                bytes
            }
        };
        // candle views the bytes as blocks (F16 fields: 2-byte alignment; Q8_K: 4). The
        // allocator aligns every buffer to 16 bytes; checked rather than assumed.
        if bytes.as_ptr() as usize % 8 != 0 {
            return Err(candle::Error::Msg(format!("`{name}`: block buffer is not 8-byte aligned")).into());
        }
        Ok(Self {
            name: name.to_string(),
            out_features,
            in_features,
            chunk_rows: default_chunk_rows(in_features),
            blocks: Blocks::Ggml { dtype, bytes, row_bytes },
        })
    }

    /// The same weight, dequantized `rows` output rows at a time (by default
    /// [`CHUNK_ELEMENTS`] / `in_features`).
    pub fn with_chunk_rows(mut self, rows: usize) -> Self {
        self.chunk_rows = rows.max(1);
        self
    }

    /// The weight's name (`model.layers.0.self_attn.q_proj.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// The format: `nf4` or the GGML type's name (`q4_1`, `q8_0`, `f16`, ...).
    pub fn format(&self) -> String {
        match &self.blocks {
            Blocks::Nf4(_) => "nf4".into(),
            Blocks::Ggml { dtype, .. } => format!("{dtype:?}").to_ascii_lowercase(),
        }
    }

    /// The NF4 blocks, when the weight is NF4.
    pub fn as_nf4(&self) -> Option<&Nf4Tensor> {
        match &self.blocks {
            Blocks::Nf4(t) => Some(t),
            Blocks::Ggml { .. } => None,
        }
    }

    /// Bytes the quantized weight holds.
    pub fn storage_bytes(&self) -> usize {
        match &self.blocks {
            Blocks::Nf4(t) => t.storage_bytes(),
            Blocks::Ggml { bytes, .. } => bytes.len(),
        }
    }

    /// Output rows `start .. start + len` dequantized to F32 (`[len, in]`) on `device`.
    ///
    /// # Errors
    /// When the rows are out of range; a tensor error.
    pub fn dequantize_rows(&self, start: usize, len: usize, device: &Device) -> Result<Tensor> {
        if start + len > self.out_features {
            candle::bail!("`{}`: rows {start}..{} of {}", self.name, start + len, self.out_features);
        }
        let t = match &self.blocks {
            Blocks::Nf4(t) => {
                let values = t.dequantize_range(start * self.in_features, len * self.in_features)?;
                Tensor::from_vec(values, (len, self.in_features), &Device::Cpu)?
            }
            Blocks::Ggml { dtype, bytes, row_bytes } => {
                let slice = &bytes[start * row_bytes..(start + len) * row_bytes];
                let storage = QStorage::from_data(Cow::Borrowed(slice), &Device::Cpu, *dtype)?;
                QTensor::new(storage, (len, self.in_features))?.dequantize(&Device::Cpu)?
            }
        };
        t.to_device(device)
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
