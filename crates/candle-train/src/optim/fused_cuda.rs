//! Fused optimizer steps on CUDA (feature `cuda`): the kernels [`super::TensorAdamW`] and
//! [`super::TensorSgd`] step with on a CUDA device, and [`FusedAdamW8bit`]; one kernel launch
//! per parameter that reads each element's parameter, gradient and state once and writes them
//! once (AdamW: 16 bytes read and 12 written per element, plus 2 for a
//! half-precision parameter's copy, against the 28 bytes per parameter of an HBM-bound step).
//!
//! The kernels (`kernels/optim.cu`, compiled to PTX by build.rs) repeat the flat-slice CPU
//! kernels' arithmetic operation for operation with round-to-nearest intrinsics, so a step is
//! bit-equal to [`super::AdamW`] / [`super::Sgd`] (and hence to torch's single-tensor
//! optimizers); `tests/device_matrix.rs` checks that on a GPU, beside the tensor-op path.
//!
//! Parameters, gradients and state must be contiguous F32 tensors on one CUDA device; the
//! parameter (or FP32 master weight) and the state are updated in place.

use candle::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle::{CudaDevice, DType, Device, Storage, Tensor, Var};
use half::{bf16, f16};

use super::adamw::Scalars;
use super::adamw8bit::MIN_QUANTIZED;
use super::quant::{code_values, Code, BLOCK};
use super::tensor_adamw::{check_tensors, host_values, one_device, refuse_slices, restore_buffer};
use super::{AdamWConfig, Optimizer, OptimizerConfig, OptimizerState, SgdConfig};
use crate::error::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
const MODULE: &str = "candle_fit_optim";

pub(crate) fn cuda_device(device: &Device) -> Result<CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d.clone()),
        other => Err(Error::config(
            "optimizer",
            format!("the fused CUDA optimizers need CUDA tensors, not {:?}", other.location()),
        )),
    }
}

/// A contiguous CUDA tensor's elements as a typed view (the guard keeps the storage alive).
fn view<'a, T: candle::cuda_backend::CudaDType>(
    storage: &'a Storage,
    layout: &candle::Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        Error::config("optimizer", format!("the fused CUDA step needs a contiguous {what}"))
    })?;
    match storage {
        Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        _ => Err(Error::config("optimizer", format!("the fused CUDA step got a {what} off CUDA"))),
    }
}

/// The sum of the squares of an F32 CUDA tensor's elements in FP64, as a scalar tensor on its
/// device: one pass reading 4 bytes per element (`candle_fit_sum_sq_f64`), deterministic.
///
/// # Errors
/// A tensor that is not F32 on CUDA, or a driver error.
pub fn sum_of_squares_f64(t: &Tensor) -> candle::Result<Tensor> {
    let Device::Cuda(device) = t.device() else {
        candle::bail!("sum_of_squares_f64: not a CUDA tensor");
    };
    if t.dtype() != DType::F32 {
        candle::bail!("sum_of_squares_f64: {:?}, not F32", t.dtype());
    }
    let t = t.contiguous()?;
    let n = t.elem_count();
    let blocks = n.div_ceil(256).clamp(1, 1024);
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else { candle::bail!("sum_of_squares_f64: not a CUDA tensor") };
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| candle::Error::Msg("not contiguous".into()))?;
    let x = cuda.as_cuda_slice::<f32>()?.slice(start..end);
    let stream = device.cuda_stream();
    let partial = stream.alloc_zeros::<f64>(blocks).map_err(|e| candle::Error::Cuda(Box::new(e)))?;
    let func = device.get_or_load_custom_func("candle_fit_sum_sq_f64", MODULE, PTX)?;
    let mut builder = func.builder();
    builder.arg(&n).arg(&x).arg(&partial);
    let config =
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the kernel takes (n, n F32 values, `blocks` FP64 outputs), as passed; it is
    // launched with the 256 threads its reduction assumes.
    unsafe { builder.launch(config) }.map_err(|e| candle::Error::Cuda(Box::new(e)))?;
    drop(storage);
    let partial = Tensor::from_storage(
        Storage::Cuda(candle::CudaStorage::wrap_cuda_slice(partial, device.clone())),
        blocks,
        candle::op::BackpropOp::none(),
        false,
    );
    partial.sum_all()
}

fn launch_config(n: usize) -> LaunchConfig {
    // A grid-stride loop: enough blocks to fill an H100 several times over, never more than
    // the elements need.
    let blocks = n.div_ceil(256).clamp(1, 132 * 32) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The model's copy a kernel writes beside the FP32 value, in the model's half type.
enum Out<'a> {
    None(u64),
    Bf16(CudaView<'a, bf16>),
    F16(CudaView<'a, f16>),
}

impl<'a> Out<'a> {
    fn new(copy: Option<(&'a Storage, &'a candle::Layout)>) -> Result<Self> {
        let Some((storage, layout)) = copy else { return Ok(Out::None(0)) };
        match storage.dtype() {
            DType::BF16 => Ok(Out::Bf16(view(storage, layout, "BF16 parameter")?)),
            DType::F16 => Ok(Out::F16(view(storage, layout, "F16 parameter")?)),
            other => Err(Error::config("optimizer", format!("no fused copy into a {other:?} parameter"))),
        }
    }

    fn suffix(&self) -> &'static str {
        match self {
            Out::None(_) => "f32",
            Out::Bf16(_) => "bf16",
            Out::F16(_) => "f16",
        }
    }

    fn push(&'a self, builder: &mut candle::cuda_backend::cudarc::driver::LaunchArgs<'a>) {
        match self {
            Out::None(null) => builder.arg(null),
            Out::Bf16(v) => builder.arg(v),
            Out::F16(v) => builder.arg(v),
        };
    }
}

pub(crate) fn check_copy(master: &Tensor, copy: &Var) -> Result<()> {
    if copy.shape() != master.shape() || !copy.device().same_device(master.device()) {
        return Err(Error::StateMismatch {
            name: "parameter copy".into(),
            expected: format!("shape {:?} on {:?}", master.dims(), master.device().location()),
            found: format!("{:?} on {:?}", copy.dims(), copy.device().location()),
        });
    }
    Ok(())
}

/// One fused AdamW step of `p` (FP32, in place) from `g` over FP32 moments `m`, `v` (in place),
/// writing the rounded value into `copy` too when given.
pub(crate) fn launch_adamw(
    device: &CudaDevice,
    index: usize,
    p: &Tensor,
    g: &Tensor,
    (m, v): (&Tensor, &Tensor),
    copy: Option<&Var>,
    s: &Scalars,
) -> Result<()> {
    check_tensors(index, m, p, g)?;
    let g = g.contiguous()?;
    let n = m.elem_count();
    let (ps, pl) = p.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (ms, ml) = m.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let copy_guard = copy.map(|c| c.as_tensor().storage_and_layout());
    let (pv, gv) = (view::<f32>(&ps, pl, "parameter")?, view::<f32>(&gs, gl, "gradient")?);
    let (mv, vv) = (view::<f32>(&ms, ml, "first moment")?, view::<f32>(&vs, vl, "second moment")?);
    let out = Out::new(copy_guard.as_ref().map(|(s, l)| (&**s, *l)))?;
    let func = device.get_or_load_custom_func(&format!("candle_fit_adamw_{}", out.suffix()), MODULE, PTX)?;
    let mut builder = func.builder();
    builder.arg(&n).arg(&pv).arg(&gv).arg(&mv).arg(&vv);
    out.push(&mut builder);
    push_scalars(&mut builder, s);
    // SAFETY: the kernel's signature is the argument list above (n, four F32 pointers, the
    // nullable copy pointer, seven f32 scalars); every view holds `n` elements and the
    // launch's grid-stride loop stays below `n`.
    unsafe { builder.launch(launch_config(n)) }.map_err(|e| candle::Error::Cuda(Box::new(e)))?;
    Ok(())
}

fn push_scalars<'a>(builder: &mut candle::cuda_backend::cudarc::driver::LaunchArgs<'a>, s: &'a Scalars) {
    builder
        .arg(&s.decay_factor)
        .arg(&s.lerp_weight)
        .arg(&s.beta2)
        .arg(&s.one_minus_beta2)
        .arg(&s.bias_correction2_sqrt)
        .arg(&s.eps)
        .arg(&s.neg_step_size);
}

/// One fused SGD step of `p` (FP32, in place) from `g`, with the momentum buffer `buf` (in
/// place; `None` without momentum), writing the rounded value into `copy` too when given.
/// `first` is the optimizer's first step (the buffer takes the gradient).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_sgd(
    device: &CudaDevice,
    index: usize,
    like: &Tensor,
    p: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    copy: Option<&Var>,
    (config, lr, decay, first): (&SgdConfig, f64, bool, bool),
) -> Result<()> {
    check_tensors(index, like, p, g)?;
    let g = g.contiguous()?;
    let n = like.elem_count();
    let weight_decay = if decay { config.weight_decay as f32 } else { 0.0 };
    let (neg_lr, momentum, keep) = (-lr as f32, config.momentum as f32, (1.0 - config.dampening) as f32);
    let (nesterov, first) = (i32::from(config.nesterov), i32::from(first));
    let (ps, pl) = p.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let buf_guard = buf.map(Tensor::storage_and_layout);
    let copy_guard = copy.map(|c| c.as_tensor().storage_and_layout());
    let (pv, gv) = (view::<f32>(&ps, pl, "parameter")?, view::<f32>(&gs, gl, "gradient")?);
    let bv = match &buf_guard {
        Some((s, l)) => Some(view::<f32>(s, l, "momentum buffer")?),
        None => None,
    };
    let out = Out::new(copy_guard.as_ref().map(|(s, l)| (&**s, *l)))?;
    let func = device.get_or_load_custom_func(&format!("candle_fit_sgd_{}", out.suffix()), MODULE, PTX)?;
    let null = 0u64;
    let mut builder = func.builder();
    builder.arg(&n).arg(&pv).arg(&gv);
    match &bv {
        Some(b) => builder.arg(b),
        None => builder.arg(&null),
    };
    out.push(&mut builder);
    builder.arg(&weight_decay).arg(&neg_lr).arg(&momentum).arg(&keep).arg(&nesterov).arg(&first);
    // SAFETY: the kernel's signature is the argument list above (n, three F32 pointers,
    // the nullable buffer and copy pointers, four f32 and two i32 scalars); every view
    // holds `n` elements and the grid-stride loop stays below `n`.
    unsafe { builder.launch(launch_config(n)) }.map_err(|e| candle::Error::Cuda(Box::new(e)))?;
    Ok(())
}

/// One parameter's moments on the GPU: FP32 for small parameters, blockwise 8-bit (codes and
/// one scale per [`BLOCK`] values) from [`MIN_QUANTIZED`] elements, as [`super::AdamW8bit`].
#[derive(Debug)]
enum Moments {
    Full { m: Tensor, v: Tensor },
    Quantized { m_codes: Tensor, m_scales: Tensor, v_codes: Tensor, v_scales: Tensor },
}

/// 8-bit AdamW with its moments on the GPU, stepped by one fused kernel per parameter
/// (dequantize, step, requantize per block of [`BLOCK`] values), bit-equal to
/// [`super::AdamW8bit`]; its state saves in the same format.
#[derive(Debug)]
pub struct FusedAdamW8bit {
    config: AdamWConfig,
    device: CudaDevice,
    step: u64,
    moments: Vec<Moments>,
    /// The signed and unsigned codes' 256 values, on the GPU.
    codes: (Tensor, Tensor),
}

impl FusedAdamW8bit {
    /// Zero moments on the CUDA device of `params` (8-bit for parameters of at least
    /// [`MIN_QUANTIZED`] elements).
    ///
    /// # Errors
    /// Bad hyper-parameters, parameters off CUDA or on several devices, a device error.
    pub fn new(config: AdamWConfig, params: &[&Tensor]) -> Result<Self> {
        let originals: Vec<usize> = params.iter().map(|p| p.elem_count()).collect();
        Self::for_pieces(config, params, &originals)
    }

    /// As [`FusedAdamW8bit::new`] for pieces of parameters (a ZeRO rank's slices):
    /// `originals[i]` is the length of the parameter `params[i]` is a piece of, which decides
    /// 8-bit or 32-bit state as [`super::AdamW8bit::for_pieces`] does (blocks start at the
    /// piece's first element).
    ///
    /// # Errors
    /// As [`FusedAdamW8bit::new`]; `originals` of another length than `params`, or a piece
    /// longer than its parameter.
    pub fn for_pieces(config: AdamWConfig, params: &[&Tensor], originals: &[usize]) -> Result<Self> {
        config.validate()?;
        if originals.len() != params.len() {
            return Err(Error::config(
                "pieces",
                format!("{} original lengths for {} pieces", originals.len(), params.len()),
            ));
        }
        if let Some((p, original)) = params.iter().zip(originals).find(|(p, &o)| p.elem_count() > o) {
            return Err(Error::config(
                "pieces",
                format!("a piece of {} elements is longer than its parameter of {original}", p.elem_count()),
            ));
        }
        let device = cuda_device(&one_device(params)?)?;
        let on = Device::Cuda(device.clone());
        let moments = params
            .iter()
            .zip(originals)
            .map(|(p, &original)| {
                let n = p.elem_count();
                Ok(if original >= MIN_QUANTIZED {
                    let blocks = n.div_ceil(BLOCK);
                    Moments::Quantized {
                        m_codes: Tensor::zeros(n, DType::U8, &on)?,
                        m_scales: Tensor::zeros(blocks, DType::F32, &on)?,
                        v_codes: Tensor::zeros(n, DType::U8, &on)?,
                        v_scales: Tensor::zeros(blocks, DType::F32, &on)?,
                    }
                } else {
                    Moments::Full {
                        m: Tensor::zeros(n, DType::F32, &on)?,
                        v: Tensor::zeros(n, DType::F32, &on)?,
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let codes = (
            Tensor::from_slice(code_values(Code::Signed), 256, &on)?,
            Tensor::from_slice(code_values(Code::Unsigned), 256, &on)?,
        );
        Ok(Self { config, device, step: 0, moments, codes })
    }

    fn launch(&self, index: usize, p: &Tensor, g: &Tensor, copy: Option<&Var>, s: &Scalars) -> Result<()> {
        let moments = self.moments.get(index).ok_or_else(|| Error::StateMismatch {
            name: format!("parameter {index}"),
            expected: format!("an index below {}", self.moments.len()),
            found: index.to_string(),
        })?;
        let (m_codes, m_scales, v_codes, v_scales) = match moments {
            Moments::Full { m, v } => {
                // Flat moments: shape the parameter and gradient like them.
                let (p, g) = (p.flatten_all()?, g.flatten_all()?);
                return launch_adamw(&self.device, index, &p, &g, (m, v), copy, s);
            }
            Moments::Quantized { m_codes, m_scales, v_codes, v_scales } => {
                (m_codes, m_scales, v_codes, v_scales)
            }
        };
        let n = m_codes.elem_count();
        let like = Tensor::zeros(n, DType::F32, p.device())?;
        let (p, g) = (p.flatten_all()?, g.flatten_all()?.contiguous()?);
        check_tensors(index, &like, &p, &g)?;
        let (ps, pl) = p.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (mcs, mcl) = m_codes.storage_and_layout();
        let (mss, msl) = m_scales.storage_and_layout();
        let (vcs, vcl) = v_codes.storage_and_layout();
        let (vss, vsl) = v_scales.storage_and_layout();
        let (scs, scl) = self.codes.0.storage_and_layout();
        let (ucs, ucl) = self.codes.1.storage_and_layout();
        let copy_guard = copy.map(|c| c.as_tensor().storage_and_layout());
        let (pv, gv) = (view::<f32>(&ps, pl, "parameter")?, view::<f32>(&gs, gl, "gradient")?);
        let (mc, ms) =
            (view::<u8>(&mcs, mcl, "first moment codes")?, view::<f32>(&mss, msl, "first moment scales")?);
        let (vc, vs) =
            (view::<u8>(&vcs, vcl, "second moment codes")?, view::<f32>(&vss, vsl, "second moment scales")?);
        let (sc, uc) = (view::<f32>(&scs, scl, "signed code")?, view::<f32>(&ucs, ucl, "unsigned code")?);
        let out = Out::new(copy_guard.as_ref().map(|(s, l)| (&**s, *l)))?;
        let name = format!("candle_fit_adamw8bit_{}", out.suffix());
        let func = self.device.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&n).arg(&pv).arg(&gv).arg(&mc).arg(&ms).arg(&vc).arg(&vs).arg(&sc).arg(&uc);
        out.push(&mut builder);
        push_scalars(&mut builder, s);
        // One CUDA block of 256 threads per quantization block (grid-stride beyond 132 * 8).
        let blocks = n.div_ceil(BLOCK).clamp(1, 132 * 8) as u32;
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the kernel's signature is the argument list above (n, two F32 pointers, the
        // codes and scales of both moments, the two code tables, the nullable copy pointer,
        // seven f32 scalars); codes hold `n` bytes, scales ceil(n / 2048) values, the tables
        // 256 values; the kernel's block size is the 256 threads launched here.
        unsafe { builder.launch(config) }.map_err(|e| candle::Error::Cuda(Box::new(e)))?;
        Ok(())
    }
}

impl Optimizer for FusedAdamW8bit {
    step_counter!("adamw8bit");

    fn update(&mut self, _: usize, _: &mut [f32], _: &[f32], _: f64, _: bool) -> Result<()> {
        Err(refuse_slices(self.name(), &Device::Cuda(self.device.clone())))
    }

    fn update_tensor(
        &mut self,
        index: usize,
        param: &Tensor,
        grad: &Tensor,
        lr: f64,
        decay: bool,
    ) -> Result<Option<Tensor>> {
        let s = Scalars::new(&self.config, self.step.max(1), lr, decay);
        self.launch(index, param, grad, None, &s)?;
        Ok(None)
    }

    fn update_master(
        &mut self,
        index: usize,
        master: &Tensor,
        grad: &Tensor,
        model: &Var,
        lr: f64,
        decay: bool,
    ) -> Result<Option<Tensor>> {
        check_copy(master, model)?;
        let s = Scalars::new(&self.config, self.step.max(1), lr, decay);
        self.launch(index, master, grad, Some(model), &s)?;
        Ok(None)
    }

    fn device(&self) -> Option<Device> {
        Some(Device::Cuda(self.device.clone()))
    }

    fn config(&self) -> Option<OptimizerConfig> {
        Some(OptimizerConfig::AdamW8bit(self.config))
    }

    fn state_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.moments
            .iter()
            .map(|m| match m {
                Moments::Full { m, v } => bytes(m) + bytes(v),
                Moments::Quantized { m_codes, m_scales, v_codes, v_scales } => {
                    bytes(m_codes) + bytes(m_scales) + bytes(v_codes) + bytes(v_scales)
                }
            })
            .sum()
    }

    /// [`super::AdamW8bit`]'s format: FP32 `exp_avg.{i}` / `exp_avg_sq.{i}` for small
    /// parameters; `{name}.{i}.codes` bytes and `{name}.{i}.scales` for quantized ones.
    fn state(&self) -> Result<OptimizerState> {
        let (mut buffers, mut quantized) =
            (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
        for (i, moments) in self.moments.iter().enumerate() {
            match moments {
                Moments::Full { m, v } => {
                    buffers.insert(format!("exp_avg.{i}"), host_values(m)?);
                    buffers.insert(format!("exp_avg_sq.{i}"), host_values(v)?);
                }
                Moments::Quantized { m_codes, m_scales, v_codes, v_scales } => {
                    quantized.insert(format!("exp_avg.{i}.codes"), m_codes.to_vec1::<u8>()?);
                    quantized.insert(format!("exp_avg_sq.{i}.codes"), v_codes.to_vec1::<u8>()?);
                    buffers.insert(format!("exp_avg.{i}.scales"), host_values(m_scales)?);
                    buffers.insert(format!("exp_avg_sq.{i}.scales"), host_values(v_scales)?);
                }
            }
        }
        Ok(OptimizerState { kind: self.name().into(), step: self.step, buffers, quantized })
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.check_kind(self.name())?;
        let on = Device::Cuda(self.device.clone());
        let mut loaded = Vec::with_capacity(self.moments.len());
        for (i, current) in self.moments.iter().enumerate() {
            loaded.push(match current {
                Moments::Full { m, v } => Moments::Full {
                    m: restore_buffer(state, format!("exp_avg.{i}"), m)?,
                    v: restore_buffer(state, format!("exp_avg_sq.{i}"), v)?,
                },
                Moments::Quantized { m_codes, m_scales, v_codes, v_scales } => {
                    let codes = |name: String, like: &Tensor| -> Result<Tensor> {
                        let bytes = state.bytes(&name, like.elem_count())?;
                        Ok(Tensor::from_slice(bytes, like.elem_count(), &on)?)
                    };
                    Moments::Quantized {
                        m_codes: codes(format!("exp_avg.{i}.codes"), m_codes)?,
                        m_scales: restore_buffer(state, format!("exp_avg.{i}.scales"), m_scales)?,
                        v_codes: codes(format!("exp_avg_sq.{i}.codes"), v_codes)?,
                        v_scales: restore_buffer(state, format!("exp_avg_sq.{i}.scales"), v_scales)?,
                    }
                }
            });
        }
        self.moments = loaded;
        self.step = state.step;
        Ok(())
    }
}
