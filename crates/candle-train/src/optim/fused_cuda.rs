//! Fused optimizer steps on CUDA (feature `cuda`): AdamW, SGD and 8-bit AdamW whose state lives on the GPU,
//! one kernel launch per parameter that reads each element's parameter, gradient and state
//! once and writes them once (AdamW: 16 bytes read and 12 written per element, plus 2 for a
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
use super::{AdamWConfig, Optimizer, OptimizerConfig, OptimizerState, Sgd, SgdConfig};
use crate::error::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
const MODULE: &str = "candle_fit_optim";

/// The fused optimizer for `config` with its state beside `params` (all on one CUDA device).
///
/// # Errors
/// [`Error::InvalidConfig`] for 8-bit AdamW (no fused kernel yet), bad hyper-parameters or
/// parameters off CUDA; a device error allocating the state.
pub fn build(config: &OptimizerConfig, params: &[&Tensor]) -> Result<Box<dyn Optimizer>> {
    let device = cuda_device(&one_device(params)?)?;
    let zeros = |p: &&Tensor| Tensor::zeros(p.shape(), DType::F32, p.device());
    match config {
        OptimizerConfig::AdamW(c) => {
            c.validate()?;
            Ok(Box::new(FusedAdamW {
                config: *c,
                device,
                step: 0,
                exp_avg: params.iter().map(zeros).collect::<candle::Result<_>>()?,
                exp_avg_sq: params.iter().map(zeros).collect::<candle::Result<_>>()?,
            }))
        }
        OptimizerConfig::Sgd(c) => {
            Sgd::new(*c, &[])?;
            let momentum = if c.momentum > 0.0 {
                params.iter().map(zeros).collect::<candle::Result<_>>()?
            } else {
                Vec::new()
            };
            Ok(Box::new(FusedSgd {
                config: *c,
                device,
                step: 0,
                momentum,
                shapes: params.iter().map(|p| p.shape().clone()).collect(),
            }))
        }
        OptimizerConfig::AdamW8bit(c) => Ok(Box::new(FusedAdamW8bit::new(*c, device, params)?)),
    }
}

fn cuda_device(device: &Device) -> Result<CudaDevice> {
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

fn check_copy(master: &Tensor, copy: &Var) -> Result<()> {
    if copy.shape() != master.shape() || !copy.device().same_device(master.device()) {
        return Err(Error::StateMismatch {
            name: "parameter copy".into(),
            expected: format!("shape {:?} on {:?}", master.dims(), master.device().location()),
            found: format!("{:?} on {:?}", copy.dims(), copy.device().location()),
        });
    }
    Ok(())
}

/// AdamW with its moments on the GPU, stepped by one fused kernel per parameter.
#[derive(Debug)]
pub struct FusedAdamW {
    config: AdamWConfig,
    device: CudaDevice,
    step: u64,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

impl FusedAdamW {
    fn launch(&self, index: usize, p: &Tensor, g: &Tensor, copy: Option<&Var>, s: &Scalars) -> Result<()> {
        let (m, v) = match (self.exp_avg.get(index), self.exp_avg_sq.get(index)) {
            (Some(m), Some(v)) => (m, v),
            _ => {
                return Err(Error::StateMismatch {
                    name: format!("parameter {index}"),
                    expected: format!("an index below {}", self.exp_avg.len()),
                    found: index.to_string(),
                })
            }
        };
        launch_adamw(&self.device, index, p, g, (m, v), copy, s)
    }
}

/// One fused AdamW step of `p` (FP32, in place) from `g` over FP32 moments `m`, `v` (in place),
/// writing the rounded value into `copy` too when given.
fn launch_adamw(
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

impl Optimizer for FusedAdamW {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn begin_step(&mut self) {
        self.step += 1;
    }

    fn step_count(&self) -> u64 {
        self.step
    }

    fn settings(&self) -> String {
        crate::trainer::canonical_json("adamw", &self.config)
    }

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
        Some(OptimizerConfig::AdamW(self.config))
    }

    fn state_bytes(&self) -> usize {
        self.exp_avg.iter().chain(&self.exp_avg_sq).map(|t| t.elem_count() * 4).sum()
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut buffers = std::collections::BTreeMap::new();
        for (i, (m, v)) in self.exp_avg.iter().zip(&self.exp_avg_sq).enumerate() {
            buffers.insert(format!("exp_avg.{i}"), host_values(m)?);
            buffers.insert(format!("exp_avg_sq.{i}"), host_values(v)?);
        }
        Ok(OptimizerState { kind: "adamw".into(), step: self.step, buffers, quantized: Default::default() })
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.check_kind("adamw")?;
        let restore = |prefix: &str, ts: &[Tensor]| {
            ts.iter()
                .enumerate()
                .map(|(i, t)| restore_buffer(state, format!("{prefix}.{i}"), t))
                .collect::<Result<Vec<_>>>()
        };
        let m = restore("exp_avg", &self.exp_avg)?;
        let v = restore("exp_avg_sq", &self.exp_avg_sq)?;
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.step = state.step;
        Ok(())
    }
}

/// SGD with its momentum buffers on the GPU, stepped by one fused kernel per parameter.
#[derive(Debug)]
pub struct FusedSgd {
    config: SgdConfig,
    device: CudaDevice,
    step: u64,
    momentum: Vec<Tensor>,
    shapes: Vec<candle::Shape>,
}

impl FusedSgd {
    fn launch(
        &self,
        index: usize,
        p: &Tensor,
        g: &Tensor,
        copy: Option<&Var>,
        lr: f64,
        decay: bool,
    ) -> Result<()> {
        let shape = self.shapes.get(index).ok_or_else(|| Error::StateMismatch {
            name: format!("parameter {index}"),
            expected: format!("an index below {}", self.shapes.len()),
            found: index.to_string(),
        })?;
        let like = match self.momentum.get(index) {
            Some(b) => b.clone(),
            None => Tensor::zeros(shape, DType::F32, p.device())?,
        };
        check_tensors(index, &like, p, g)?;
        let g = g.contiguous()?;
        let n = like.elem_count();
        let c = &self.config;
        let weight_decay = if decay { c.weight_decay as f32 } else { 0.0 };
        let (neg_lr, momentum, keep) = (-lr as f32, c.momentum as f32, (1.0 - c.dampening) as f32);
        let (nesterov, first) = (i32::from(c.nesterov), i32::from(self.step <= 1));
        let (ps, pl) = p.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let buf = self.momentum.get(index).map(Tensor::storage_and_layout);
        let copy_guard = copy.map(|c| c.as_tensor().storage_and_layout());
        let (pv, gv) = (view::<f32>(&ps, pl, "parameter")?, view::<f32>(&gs, gl, "gradient")?);
        let bv = match &buf {
            Some((s, l)) => Some(view::<f32>(s, l, "momentum buffer")?),
            None => None,
        };
        let out = Out::new(copy_guard.as_ref().map(|(s, l)| (&**s, *l)))?;
        let func =
            self.device.get_or_load_custom_func(&format!("candle_fit_sgd_{}", out.suffix()), MODULE, PTX)?;
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
}

impl Optimizer for FusedSgd {
    fn name(&self) -> &'static str {
        "sgd"
    }

    fn begin_step(&mut self) {
        self.step += 1;
    }

    fn step_count(&self) -> u64 {
        self.step
    }

    fn settings(&self) -> String {
        crate::trainer::canonical_json("sgd", &self.config)
    }

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
        self.launch(index, param, grad, None, lr, decay)?;
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
        self.launch(index, master, grad, Some(model), lr, decay)?;
        Ok(None)
    }

    fn device(&self) -> Option<Device> {
        Some(Device::Cuda(self.device.clone()))
    }

    fn config(&self) -> Option<OptimizerConfig> {
        Some(OptimizerConfig::Sgd(self.config))
    }

    fn state_bytes(&self) -> usize {
        self.momentum.iter().map(|t| t.elem_count() * 4).sum()
    }

    fn state(&self) -> Result<OptimizerState> {
        let buffers = self
            .momentum
            .iter()
            .enumerate()
            .map(|(i, b)| Ok((format!("momentum.{i}"), host_values(b)?)))
            .collect::<Result<_>>()?;
        Ok(OptimizerState { kind: "sgd".into(), step: self.step, buffers, quantized: Default::default() })
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        state.check_kind("sgd")?;
        let loaded = self
            .momentum
            .iter()
            .enumerate()
            .map(|(i, b)| restore_buffer(state, format!("momentum.{i}"), b))
            .collect::<Result<Vec<_>>>()?;
        self.momentum = loaded;
        self.step = state.step;
        Ok(())
    }
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
    fn new(config: AdamWConfig, device: CudaDevice, params: &[&Tensor]) -> Result<Self> {
        config.validate()?;
        let on = Device::Cuda(device.clone());
        let moments = params
            .iter()
            .map(|p| {
                let n = p.elem_count();
                Ok(if n >= MIN_QUANTIZED {
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
    fn name(&self) -> &'static str {
        "adamw8bit"
    }

    fn begin_step(&mut self) {
        self.step += 1;
    }

    fn step_count(&self) -> u64 {
        self.step
    }

    fn settings(&self) -> String {
        crate::trainer::canonical_json("adamw8bit", &self.config)
    }

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
