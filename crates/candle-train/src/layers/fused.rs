//! Fused CPU kernels for the element-wise work of a training step, each one pass over memory
//! with one output buffer (Candle evaluates them as chains of tensor ops, one fresh buffer per
//! op): the tanh-GELU forward and backward, the bias added in place to a matmul's fresh
//! output, the bias gradient (the sum over rows), the causal softmax's forward and softmax's
//! backward, dropout, layer normalisation forward and backward, and `matmul` (Candle's CPU
//! products without its zero fill and BF16 conversions, BF16 through the AVX-512 BF16 kernel of
//! `gemm_bf16` where the CPU has one; for values computed outside the graph).
//! Large tensors are split over rayon's threads in fixed chunks, so results do not depend on the
//! number of threads.
//!
//! F32 kernels, and the half-precision ones (generic over `Narrow`), are compiled twice, for
//! the baseline x86-64 target and with AVX2 + FMA, and picked at run time. F64 runs the
//! textbook formulas with `f64::tanh` (the finite-difference reference); BF16/F16 compute in
//! F32 and round once. On other devices, and for layouts the
//! kernels do not take, the same values come from Candle's tensor ops.

use std::mem::MaybeUninit;

use candle::backend::BackendStorage;
use candle::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Result, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use crate::layers::gemm_bf16;

/// Elements per parallel task: large enough that a task outweighs rayon's scheduling, small
/// enough that a `[rows, 4 n_embd]` activation spreads over every thread.
const CHUNK: usize = 1 << 14;

/// `sqrt(2 / pi)`, GPT-2's `gelu_new` constant.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient of the tanh approximation.
const GELU_CUBIC: f64 = 0.044_715;

/// `tanh` in F32 as Eigen (and hence PyTorch's vectorised CPU kernels) evaluates it: a 13/6
/// rational approximation on `[-7.9053, 7.9053]` (where `tanh` rounds to +-1 in F32), the
/// identity below 4e-4. Absolute error below 5e-7 everywhere (4.3e-7 at worst, near |x| = 5.8,
/// about 7 ulp; tested against `f64::tanh`).
/// Branch-free, so loops over it vectorise (`f32::tanh` is a scalar libm call).
#[inline(always)]
fn tanh_f32(a: f32) -> f32 {
    let x = a.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let mut p = x2 * -2.760_768_5e-16 + 2.000_188e-13;
    p = x2 * p + -8.604_672e-11;
    p = x2 * p + 5.122_297e-8;
    p = x2 * p + 1.485_722_4e-5;
    p = x2 * p + 6.372_619_3e-4;
    p = x2 * p + 4.893_524_6e-3;
    p *= x;
    let mut q = x2 * 1.198_258_4e-6 + 1.185_347e-4;
    q = x2 * q + 2.268_434_6e-3;
    q = x2 * q + 4.893_525e-3;
    if a.abs() < 4e-4 {
        a
    } else {
        p / q
    }
}

#[inline(always)]
fn gelu_f32(x: f32) -> f32 {
    let (k, c) = (SQRT_2_OVER_PI as f32, GELU_CUBIC as f32);
    0.5 * x * (1.0 + tanh_f32(k * (x + c * x * x * x)))
}

#[inline(always)]
fn gelu_grad_f32(x: f32, g: f32) -> f32 {
    let (k, c) = (SQRT_2_OVER_PI as f32, GELU_CUBIC as f32);
    let x2 = x * x;
    let t = tanh_f32(k * x * (1.0 + c * x2));
    g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * c * x2))
}

fn gelu_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)).tanh())
}

fn gelu_grad_f64(x: f64, g: f64) -> f64 {
    let x2 = x * x;
    let t = (SQRT_2_OVER_PI * x * (1.0 + GELU_CUBIC * x2)).tanh();
    g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x2))
}

/// F32 slice kernels, each compiled for the baseline target and for AVX2 + FMA and dispatched
/// at run time (the detection is cached by std).
macro_rules! f32_kernel {
    ($name:ident, $generic:ident, $avx2:ident, ($($arg:ident: $ty:ty),*), $body:block) => {
        #[inline(always)]
        fn $generic($($arg: $ty),*) $body

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        // SAFETY (for callers): only called after detecting AVX2 and FMA.
        unsafe fn $avx2($($arg: $ty),*) {
            $generic($($arg),*)
        }

        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { $avx2($($arg),*) };
            }
            $generic($($arg),*)
        }
    };
}

f32_kernel!(gelu_fwd_slice, gelu_fwd_generic, gelu_fwd_avx2, (x: &[f32], out: &mut [MaybeUninit<f32>]), {
    for (o, &x) in out.iter_mut().zip(x) {
        o.write(gelu_f32(x));
    }
});

f32_kernel!(
    gelu_bwd_slice,
    gelu_bwd_generic,
    gelu_bwd_avx2,
    (x: &[f32], g: &[f32], out: &mut [MaybeUninit<f32>]),
    {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
            o.write(gelu_grad_f32(x, g));
        }
    }
);

f32_kernel!(add_rows_slice, add_rows_generic, add_rows_avx2, (rows: &mut [f32], bias: &[f32]), {
    for row in rows.chunks_exact_mut(bias.len()) {
        for (y, &b) in row.iter_mut().zip(bias) {
            *y += b;
        }
    }
});

f32_kernel!(sum_rows_slice, sum_rows_generic, sum_rows_avx2, (rows: &[f32], acc: &mut [f32]), {
    for row in rows.chunks_exact(acc.len()) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
});

/// Slice kernels generic over the half types ([`Narrow`]), compiled for the baseline target and
/// for AVX2 + FMA and dispatched at run time, as [`f32_kernel`]'s.
macro_rules! half_kernel {
    ($name:ident, $generic:ident, $avx2:ident, ($($arg:ident: $ty:ty),*), $body:block) => {
        #[inline(always)]
        fn $generic<T: Narrow>($($arg: $ty),*) $body

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        // SAFETY (for callers): only called after detecting AVX2 and FMA.
        unsafe fn $avx2<T: Narrow>($($arg: $ty),*) {
            $generic($($arg),*)
        }

        fn $name<T: Narrow>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { $avx2($($arg),*) };
            }
            $generic($($arg),*)
        }
    };
}

// `y + b` as `half`'s `Add` computes it (in F32, rounded once): `broadcast_add` bit for bit.
half_kernel!(add_rows_half, add_rows_half_generic, add_rows_half_avx2, (rows: &mut [T], bias: &[T]), {
    for row in rows.chunks_exact_mut(bias.len()) {
        for (y, &b) in row.iter_mut().zip(bias) {
            *y = T::narrow(y.widen() + b.widen());
        }
    }
});

// Softmax's backward `scale * y * (g - sum(g * y))` on rows `n` wide of half-precision values:
// the products are exact in F32 (8- or 11-bit significands), summed in F64, the rest in F32,
// rounded once.
half_kernel!(
    softmax_backward_half,
    softmax_backward_half_generic,
    softmax_backward_half_avx2,
    (y: &[T], g: &[T], n: usize, scale: f32, out: &mut [MaybeUninit<T>]),
    {
        for ((yr, gr), o) in y.chunks_exact(n).zip(g.chunks_exact(n)).zip(out.chunks_exact_mut(n)) {
            let dot: f64 = yr.iter().zip(gr).map(|(y, g)| f64::from(y.widen() * g.widen())).sum();
            let dot = dot as f32;
            for ((o, y), g) in o.iter_mut().zip(yr).zip(gr) {
                o.write(T::narrow(scale * y.widen() * (g.widen() - dot)));
            }
        }
    }
);

// The same for F32 (and by `softmax_backward_f64` for F64), computed in F64 and rounded once.
f32_kernel!(
    softmax_backward_f32,
    softmax_backward_f32_generic,
    softmax_backward_f32_avx2,
    (y: &[f32], g: &[f32], n: usize, scale: f64, out: &mut [MaybeUninit<f32>]),
    {
        for ((yr, gr), o) in y.chunks_exact(n).zip(g.chunks_exact(n)).zip(out.chunks_exact_mut(n)) {
            let dot: f64 = yr.iter().zip(gr).map(|(&y, &g)| f64::from(y) * f64::from(g)).sum();
            for ((o, &y), &g) in o.iter_mut().zip(yr).zip(gr) {
                o.write((scale * f64::from(y) * (f64::from(g) - dot)) as f32);
            }
        }
    }
);

fn softmax_backward_f64(y: &[f64], g: &[f64], n: usize, scale: f64, out: &mut [MaybeUninit<f64>]) {
    for ((yr, gr), o) in y.chunks_exact(n).zip(g.chunks_exact(n)).zip(out.chunks_exact_mut(n)) {
        let dot: f64 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
        for ((o, y), g) in o.iter_mut().zip(yr).zip(gr) {
            o.write(scale * y * (g - dot));
        }
    }
}

/// Softmax's backward `scale * y * (g - sum(g * y))` over the last dimension (`n` wide) of
/// contiguous CPU tensors `y` and `g` of one dtype and shape, rows split over rayon's threads
/// (each row computed alone, so the values do not depend on the split): F32 and F64 in F64,
/// BF16/F16 as [`softmax_backward_half`]. Only the result is allocated. `None` elsewhere.
///
/// # Errors
/// On a tensor error.
pub(crate) fn softmax_backward(y: &Tensor, g: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if y.dtype() != g.dtype() || y.dims() != g.dims() || y.rank() == 0 {
        return Ok(None);
    }
    let n = y.dim(candle::D::Minus1)?;
    let (Some((ys, y0, y1)), Some((gs, g0, _))) = (cpu_slice(y), cpu_slice(g)) else {
        return Ok(None);
    };
    let (Storage::Cpu(yc), Storage::Cpu(gc)) = (&*ys, &*gs) else {
        return Ok(None);
    };
    if n == 0 {
        return Ok(None);
    }
    fn run<T: Send + Sync, U: Send>(
        y: &[T],
        g: &[T],
        n: usize,
        kernel: impl Fn(&[T], &[T], &mut [MaybeUninit<U>]) + Sync,
    ) -> Vec<U> {
        par_fill_rows(y.len(), n, |first, rows| {
            let (start, end) = (first * n, first * n + rows.len());
            kernel(&y[start..end], &g[start..end], rows)
        })
    }
    let len = y1 - y0;
    let (shape, device) = (y.shape(), &candle::Device::Cpu);
    let scale32 = scale as f32;
    let grad = match (yc, gc) {
        (CpuStorage::F32(y), CpuStorage::F32(g)) => {
            let (y, g) = (&y[y0..y1], &g[g0..g0 + len]);
            Tensor::from_vec(run(y, g, n, |y, g, o| softmax_backward_f32(y, g, n, scale, o)), shape, device)?
        }
        (CpuStorage::F64(y), CpuStorage::F64(g)) => {
            let (y, g) = (&y[y0..y1], &g[g0..g0 + len]);
            Tensor::from_vec(run(y, g, n, |y, g, o| softmax_backward_f64(y, g, n, scale, o)), shape, device)?
        }
        (CpuStorage::BF16(y), CpuStorage::BF16(g)) => {
            let (y, g) = (&y[y0..y1], &g[g0..g0 + len]);
            Tensor::from_vec(
                run(y, g, n, |y, g, o| softmax_backward_half(y, g, n, scale32, o)),
                shape,
                device,
            )?
        }
        (CpuStorage::F16(y), CpuStorage::F16(g)) => {
            let (y, g) = (&y[y0..y1], &g[g0..g0 + len]);
            Tensor::from_vec(
                run(y, g, n, |y, g, o| softmax_backward_half(y, g, n, scale32, o)),
                shape,
                device,
            )?
        }
        _ => return Ok(None),
    };
    Ok(Some(grad))
}

/// `n` outputs from `fill(start, chunk)` over fixed chunks, in parallel when there are
/// several chunks. Every element is written exactly once: `fill` must write the whole chunk.
fn par_fill<U: Send>(n: usize, fill: impl Fn(usize, &mut [MaybeUninit<U>]) + Sync) -> Vec<U> {
    let mut out = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    if n <= CHUNK {
        fill(0, spare);
    } else {
        spare.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| fill(i * CHUNK, chunk));
    }
    // SAFETY: `fill` wrote every element of the first `n` (the chunks cover them all).
    unsafe { out.set_len(n) };
    out
}

/// Runs an F32 slice kernel on half-precision values: each block is widened into a stack
/// buffer, computed in F32 and rounded once.
fn via_f32<T: Narrow>(
    inputs: &[&[T]],
    out: &mut [MaybeUninit<T>],
    kernel: impl Fn(&[&[f32]], &mut [MaybeUninit<f32>]),
) {
    const BLOCK: usize = 256;
    let mut wide = [[0f32; BLOCK]; 2];
    let mut result = [MaybeUninit::<f32>::uninit(); BLOCK];
    for (b, o) in out.chunks_mut(BLOCK).enumerate() {
        let len = o.len();
        for (w, input) in wide.iter_mut().zip(inputs) {
            for (w, v) in w.iter_mut().zip(&input[b * BLOCK..b * BLOCK + len]) {
                *w = v.widen();
            }
        }
        let args: Vec<&[f32]> = wide.iter().take(inputs.len()).map(|w| &w[..len]).collect();
        kernel(&args, &mut result[..len]);
        for (o, r) in o.iter_mut().zip(&result[..len]) {
            // SAFETY: the kernel wrote the first `len` results.
            o.write(T::narrow(unsafe { r.assume_init() }));
        }
    }
}

/// The dtypes the F32 kernels take, with their direct conversions (`half`'s bit-level ones:
/// `WithDType`'s through F64 cost more than the kernels).
trait Narrow: WithDType {
    fn widen(self) -> f32;
    fn narrow(value: f32) -> Self;
}

impl Narrow for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        value
    }
}

impl Narrow for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        bf16_from_f32(value)
    }
}

/// `half::bf16::from_f32` bit for bit (round to nearest even; a NaN keeps its sign and top
/// payload bits and is made quiet), without branches, so loops over it vectorise (`half`'s
/// version branches per value; the AVX-512 BF16 instruction `vcvtneps2bf16` would also flush
/// subnormals to zero, and is not in every x86-64 CPU).
#[inline(always)]
pub(crate) fn bf16_from_f32(value: f32) -> half::bf16 {
    let bits = value.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    let is_nan = bits & 0x7fff_ffff > 0x7f80_0000;
    half::bf16::from_bits(if is_nan { quiet_nan } else { rounded } as u16)
}

impl Narrow for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(value: f32) -> Self {
        Self::from_f32(value)
    }
}

/// A contiguous CPU tensor's values, or `None`.
fn cpu_slice(t: &Tensor) -> Option<(impl std::ops::Deref<Target = Storage> + '_, usize, usize)> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    matches!(&*storage, Storage::Cpu(_)).then_some((storage, start, end))
}

/// The tanh-approximation GELU (GPT-2's `gelu_new`, Candle's `gelu`):
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, forward in one pass and with a one-pass
/// backward `g * gelu'(x)`. Only `x` and the result stay in the graph, as with Candle's op, and
/// the backward allocates only the gradient (Candle's holds about ten temporaries of `x`'s size).
/// On other devices, for a non-contiguous `x` or another dtype, it is Candle's `gelu`.
///
/// # Errors
/// On a tensor error.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let fused = x.device().is_cpu()
        && x.is_contiguous()
        && matches!(x.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16);
    if fused {
        x.apply_op1(GeluTanh)
    } else {
        x.gelu()
    }
}

/// The custom op behind [`gelu_tanh`]: its forward computes from the input's storage (one
/// buffer); CPU only (callers check the device).
struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle::bail!("gelu-tanh: the input is not contiguous");
        };
        let n = end - start;
        let out = match storage {
            CpuStorage::F32(v) => {
                let x = &v[start..end];
                CpuStorage::F32(par_fill(n, |i, o| gelu_fwd_slice(&x[i..i + o.len()], o)))
            }
            CpuStorage::F64(v) => {
                let x = &v[start..end];
                CpuStorage::F64(par_fill(n, |i, o| {
                    for (o, &x) in o.iter_mut().zip(&x[i..]) {
                        o.write(gelu_f64(x));
                    }
                }))
            }
            CpuStorage::BF16(v) => CpuStorage::BF16(half_gelu(&v[start..end])),
            CpuStorage::F16(v) => CpuStorage::F16(half_gelu(&v[start..end])),
            other => candle::bail!("gelu-tanh: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if let Some(grad) = gelu_tanh_backward_cpu(x, g)? {
            return Ok(Some(grad));
        }
        // The same derivative from tensor ops (a gradient that is not contiguous).
        let dtype = x.dtype();
        let wide = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let (x, g) = (x.to_dtype(wide)?, g.to_dtype(wide)?);
        let x2 = x.sqr()?;
        let t = ((&x * SQRT_2_OVER_PI)? * ((&x2 * GELU_CUBIC)? + 1.0)?)?.tanh()?;
        let left = ((&t + 1.0)? * 0.5)?;
        let right =
            ((((&x * 0.5)? * (1.0 - t.sqr()?)?)? * ((&x2 * (3.0 * GELU_CUBIC))? + 1.0)?)? * SQRT_2_OVER_PI)?;
        Ok(Some((g * (left + right)?)?.to_dtype(dtype)?))
    }
}

/// GELU's backward `g * gelu'(x)` for `x` and `g` of one shape and dtype: the one-pass kernel
/// on contiguous CPU tensors, else the same derivative from tensor ops ([`gelu_tanh`]'s
/// backward).
///
/// # Errors
/// On a tensor error.
pub(crate) fn gelu_tanh_grad(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    match GeluTanh.bwd(x, x, g)? {
        Some(grad) => Ok(grad),
        None => candle::bail!("gelu-tanh: no gradient"),
    }
}

fn half_gelu<T: Narrow>(x: &[T]) -> Vec<T> {
    par_fill(x.len(), |i, o| via_f32(&[&x[i..i + o.len()]], o, |args, out| gelu_fwd_slice(args[0], out)))
}

/// GELU's backward `g * gelu'(x)` when `x` and `g` are contiguous CPU tensors of one dtype and
/// shape; `None` elsewhere.
fn gelu_tanh_backward_cpu(x: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
    if x.dtype() != g.dtype() || x.dims() != g.dims() {
        return Ok(None);
    }
    let (Some((xs, x0, x1)), Some((gs, g0, _))) = (cpu_slice(x), cpu_slice(g)) else {
        return Ok(None);
    };
    let n = x1 - x0;
    let (Storage::Cpu(xc), Storage::Cpu(gc)) = (&*xs, &*gs) else {
        return Ok(None);
    };
    let grad = match (xc, gc) {
        (CpuStorage::F32(x), CpuStorage::F32(g)) => {
            let (x, g) = (&x[x0..x1], &g[g0..g0 + n]);
            Tensor::from_vec(
                par_fill(n, |i, o| gelu_bwd_slice(&x[i..i + o.len()], &g[i..i + o.len()], o)),
                n,
                &candle::Device::Cpu,
            )?
        }
        (CpuStorage::F64(x), CpuStorage::F64(g)) => {
            let (x, g) = (&x[x0..x1], &g[g0..g0 + n]);
            let out = par_fill(n, |i, o| {
                for ((o, &x), &g) in o.iter_mut().zip(&x[i..]).zip(&g[i..]) {
                    o.write(gelu_grad_f64(x, g));
                }
            });
            Tensor::from_vec(out, n, &candle::Device::Cpu)?
        }
        (CpuStorage::BF16(x), CpuStorage::BF16(g)) => {
            Tensor::from_vec(half_gelu_grad(&x[x0..x1], &g[g0..g0 + n]), n, &candle::Device::Cpu)?
        }
        (CpuStorage::F16(x), CpuStorage::F16(g)) => {
            Tensor::from_vec(half_gelu_grad(&x[x0..x1], &g[g0..g0 + n]), n, &candle::Device::Cpu)?
        }
        _ => return Ok(None),
    };
    drop((xs, gs));
    Ok(Some(grad.reshape(x.shape())?))
}

fn half_gelu_grad<T: Narrow>(x: &[T], g: &[T]) -> Vec<T> {
    par_fill(x.len(), |i, o| {
        let end = i + o.len();
        via_f32(&[&x[i..end], &g[i..end]], o, |args, out| gelu_bwd_slice(args[0], args[1], out))
    })
}

/// Adds `bias` (`[n]`) to every row of `y` (`[rows, n]`) in place. Only for a `y` that nothing
/// else holds (a matmul's fresh output) and that tracks no gradient.
struct AddBiasInPlace;

impl InplaceOp2 for AddBiasInPlace {
    fn name(&self) -> &'static str {
        "add-bias-in-place"
    }

    fn cpu_fwd(&self, y: &mut CpuStorage, yl: &Layout, b: &CpuStorage, bl: &Layout) -> Result<()> {
        fn rows<T: WithDType>(y: &mut [T], b: &[T], add: impl Fn(&mut [T], &[T]) + Sync) {
            let n = b.len();
            if n == 0 {
                return;
            }
            let rows_per_task = (CHUNK / n).max(1);
            if y.len() <= CHUNK {
                add(y, b);
            } else {
                y.par_chunks_mut(rows_per_task * n).for_each(|chunk| add(chunk, b));
            }
        }
        let (Some((y0, y1)), Some((b0, b1))) = (yl.contiguous_offsets(), bl.contiguous_offsets()) else {
            candle::bail!("add-bias-in-place: non-contiguous operands");
        };
        match (y, b) {
            (CpuStorage::F32(y), CpuStorage::F32(b)) => rows(&mut y[y0..y1], &b[b0..b1], add_rows_slice),
            (CpuStorage::F64(y), CpuStorage::F64(b)) => rows(&mut y[y0..y1], &b[b0..b1], add_rows_plain),
            (CpuStorage::BF16(y), CpuStorage::BF16(b)) => rows(&mut y[y0..y1], &b[b0..b1], add_rows_half),
            (CpuStorage::F16(y), CpuStorage::F16(b)) => rows(&mut y[y0..y1], &b[b0..b1], add_rows_half),
            _ => candle::bail!("add-bias-in-place: unsupported dtypes"),
        }
        Ok(())
    }
}

fn add_rows_plain<T: WithDType>(rows: &mut [T], bias: &[T]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        for (y, &b) in row.iter_mut().zip(bias) {
            *y += b;
        }
    }
}

/// `y + bias` over the rows of `y` (`[rows, n]`, `bias` `[n]`, one dtype): in place on the CPU
/// when `y` is contiguous and untracked (the caller's own fresh buffer, such as a matmul's
/// output: nothing else may hold it), else Candle's `broadcast_add`. Equal to `broadcast_add`
/// bit for bit (one addition per element, in the tensors' dtype).
///
/// # Errors
/// On a shape or dtype mismatch.
pub(crate) fn add_bias_owned(y: Tensor, bias: &Tensor) -> Result<Tensor> {
    let in_place = y.device().is_cpu()
        && !y.track_op()
        && y.dtype() == bias.dtype()
        && y.rank() == 2
        && bias.dims() == [y.dim(1)?]
        && y.is_contiguous()
        && bias.is_contiguous();
    if !in_place {
        return y.broadcast_add(bias);
    }
    y.inplace_op2(bias, &AddBiasInPlace)?;
    Ok(y)
}

/// Rows summed per block of the bias gradient: the blocks' partial sums are added in order,
/// so the result does not depend on the number of threads.
const SUM_BLOCK_ROWS: usize = 64;

/// The bias gradient: `g` (`[rows, n]`) summed over its rows, accumulated in F32 (F64 for F64)
/// and returned in `dtype`. On the CPU for a contiguous `g`, one pass per block of 64 rows
/// (blocks in parallel, their sums added in order); elsewhere Candle's `sum(0)` in F32.
///
/// # Errors
/// On a tensor error or a `g` that is not two-dimensional.
pub fn bias_grad(g: &Tensor, dtype: DType) -> Result<Tensor> {
    let (_, n) = g.dims2()?;
    if let Some((storage, start, end)) = cpu_slice(g) {
        let summed = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => {
                Some(Tensor::from_vec(sum_rows(&v[start..end], n, sum_rows_slice), n, g.device())?)
            }
            Storage::Cpu(CpuStorage::F64(v)) => {
                Some(Tensor::from_vec(sum_rows(&v[start..end], n, sum_rows_plain), n, g.device())?)
            }
            Storage::Cpu(CpuStorage::BF16(v)) => {
                Some(Tensor::from_vec(sum_rows(&v[start..end], n, sum_rows_widened), n, g.device())?)
            }
            Storage::Cpu(CpuStorage::F16(v)) => {
                Some(Tensor::from_vec(sum_rows(&v[start..end], n, sum_rows_widened), n, g.device())?)
            }
            _ => None,
        };
        drop(storage);
        if let Some(summed) = summed {
            return summed.to_dtype(dtype);
        }
    }
    let rd = if g.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    g.to_dtype(rd)?.sum(0)?.to_dtype(dtype)
}

/// The sum of the rows (`n` wide) of `v`: `add(block, acc)` adds a block of at most
/// `SUM_BLOCK_ROWS` rows into `acc`; the blocks run in parallel when there are several and
/// their partial sums are added in block order.
fn sum_rows<T: Sync, A: WithDType>(v: &[T], n: usize, add: impl Fn(&[T], &mut [A]) + Sync) -> Vec<A> {
    if n == 0 {
        return Vec::new();
    }
    let block = SUM_BLOCK_ROWS * n;
    let partial = |rows: &[T]| {
        let mut acc = vec![A::zero(); n];
        add(rows, &mut acc);
        acc
    };
    if v.len() <= block {
        return partial(v);
    }
    let partials: Vec<Vec<A>> = v.par_chunks(block).map(partial).collect();
    let mut total = vec![A::zero(); n];
    for p in partials {
        for (t, x) in total.iter_mut().zip(p) {
            *t += x;
        }
    }
    total
}

fn sum_rows_plain(rows: &[f64], acc: &mut [f64]) {
    for row in rows.chunks_exact(acc.len()) {
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += x;
        }
    }
}

fn sum_rows_widened<T: Narrow>(rows: &[T], acc: &mut [f32]) {
    for row in rows.chunks_exact(acc.len()) {
        for (a, x) in acc.iter_mut().zip(row) {
            *a += x.widen();
        }
    }
}

/// Dropout as one op on a contiguous CPU tensor: the keep/drop decisions are drawn from `rng`
/// exactly as [`Dropout`](crate::layers::Dropout) draws them (one `uniform_f32` per element in
/// order, dropped below `p`; chunks drawn in parallel from skipped copies of `rng`, which ends
/// advanced by the element count) and kept as one byte per element (the unfused op keeps a mask
/// in `x`'s dtype, F32 while it is drawn). Forward `x * m` and backward `g * m` with
/// `m = 1 / (1 - p)` (rounded to `x`'s dtype) or 0: the unfused op's values bit for bit. `None`
/// (and `rng` untouched) where the kernel does not apply.
///
/// # Errors
/// On a tensor error.
pub(crate) fn dropout(x: &Tensor, p: f32, rng: &mut candle_ckpt::Rng) -> Result<Option<Tensor>> {
    let fused = x.device().is_cpu()
        && x.is_contiguous()
        && matches!(x.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16);
    if !fused {
        return Ok(None);
    }
    let n = x.elem_count();
    let start = rng.clone();
    let keep: Vec<u8> = par_fill(n, |i, out| {
        let mut r = start.clone();
        r.skip(i as u64);
        for o in out {
            o.write(u8::from(r.uniform_f32() >= p));
        }
    });
    rng.skip(n as u64);
    let scale = 1.0 / (1.0 - f64::from(p));
    x.apply_op1(DropoutMask { keep, scale }).map(Some)
}

/// The op behind [`dropout`]: its mask, one byte per element (1 keep, 0 drop), and the scale.
struct DropoutMask {
    keep: Vec<u8>,
    scale: f64,
}

impl DropoutMask {
    /// `v * (scale or 0)` per element, in `v`'s dtype (as Candle's `mul` by the unfused mask).
    fn apply<T: WithDType>(&self, v: &[T]) -> Vec<T> {
        // The mask's values as the unfused path builds them: F64 directly, else F32 rounded to T.
        let kept = if T::DTYPE == DType::F64 {
            T::from_f64(self.scale)
        } else {
            T::from_f64(f64::from(self.scale as f32))
        };
        let (kept, dropped) = (kept, T::zero());
        par_fill(v.len(), |i, out| {
            for ((o, &x), &k) in out.iter_mut().zip(&v[i..]).zip(&self.keep[i..]) {
                o.write(x * if k == 1 { kept } else { dropped });
            }
        })
    }

    fn storage(&self, storage: &CpuStorage, layout: &Layout) -> Result<CpuStorage> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle::bail!("dropout: the tensor is not contiguous");
        };
        if end - start != self.keep.len() {
            candle::bail!("dropout: {} elements for a mask of {}", end - start, self.keep.len());
        }
        Ok(match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.apply(&v[start..end])),
            CpuStorage::F64(v) => CpuStorage::F64(self.apply(&v[start..end])),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.apply(&v[start..end])),
            CpuStorage::F16(v) => CpuStorage::F16(self.apply(&v[start..end])),
            other => candle::bail!("dropout: unsupported dtype {:?}", other.dtype()),
        })
    }
}

impl CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.storage(storage, layout)?, layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        g.contiguous()?.apply_op1_no_bwd(self).map(Some)
    }
}

/// The forward of [`ops::causal_softmax`](crate::layers::ops::causal_softmax) as one op on a
/// contiguous CPU tensor (`[..., t, t]`): each row's softmax of `scores * scale` over the
/// positions at or before its own, in one pass per row in F32 (F64 for F64) with one output
/// buffer (the unfused forward holds an F32 copy, the mask and a temporary per step). The same
/// operations in the same order as the unfused ops (scale, max, `exp(x - max)`, sum, divide),
/// with a vectorised `exp` within 2 ulp of libm's and the sum in eight partial sums: the
/// values agree to that rounding (1e-6 relative, tested). Backward: softmax's one-pass backward.
/// `None` where the kernel does not apply.
///
/// # Errors
/// On a tensor error.
pub(crate) fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let dims = scores.dims();
    let fused = scores.device().is_cpu()
        && scores.is_contiguous()
        && matches!(scores.dtype(), DType::F32 | DType::F64 | DType::BF16 | DType::F16)
        && dims.len() >= 2
        && dims[dims.len() - 1] == dims[dims.len() - 2]
        && dims[dims.len() - 1] > 0;
    if !fused {
        return Ok(None);
    }
    scores.apply_op1(CausalSoftmax { scale }).map(Some)
}

struct CausalSoftmax {
    scale: f64,
}

/// `e^x` in F32 without branches, so loops over it vectorise (libm's `expf` is a scalar call):
/// Cephes' `expf`, a degree-5 polynomial on `x - n ln 2` scaled by `2^n`. Within 2 ulp of the
/// exact value on `[-87, 88]` (tested against `f64::exp`); `x` is clamped to that range (below
/// it the result is about 1.6e-38 instead of a subnormal or 0, above 1.65e38 instead of up to
/// infinity); NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Row `i` (of `t`) of a causal softmax in F32: `x` the row's scores, `out` the row. The sum
/// runs in eight interleaved partial sums (so it vectorises), added at the end.
#[inline(always)]
fn causal_row_f32<T: Narrow>(x: &[T], i: usize, scale: f32, wide: &mut [f32], out: &mut [MaybeUninit<T>]) {
    let mut max = f32::NEG_INFINITY;
    for (w, v) in wide.iter_mut().zip(&x[..=i]) {
        *w = v.widen() * scale;
        max = max.max(*w);
    }
    let mut lanes = [0f32; 8];
    let mut chunks = wide[..=i].chunks_exact_mut(8);
    for chunk in &mut chunks {
        for (w, lane) in chunk.iter_mut().zip(&mut lanes) {
            *w = exp_f32(*w - max);
            *lane += *w;
        }
    }
    for (w, lane) in chunks.into_remainder().iter_mut().zip(&mut lanes) {
        *w = exp_f32(*w - max);
        *lane += *w;
    }
    let sum =
        ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (o, w) in out.iter_mut().zip(&wide[..=i]) {
        o.write(T::narrow(*w / sum));
    }
    for o in &mut out[i + 1..] {
        o.write(T::zero());
    }
}

// Rows `first ..` (each `t` wide, row `r` the `r % t`-th of its matrix) of a causal softmax.
half_kernel!(
    causal_rows,
    causal_rows_generic,
    causal_rows_avx2,
    (x: &[T], t: usize, first: usize, scale: f32, rows: &mut [MaybeUninit<T>]),
    {
        let mut wide = vec![0f32; t];
        for (k, row) in rows.chunks_mut(t).enumerate() {
            let r = first + k;
            causal_row_f32(&x[r * t..(r + 1) * t], r % t, scale, &mut wide, row);
        }
    }
);

fn causal_row_f64(x: &[f64], i: usize, scale: f64, out: &mut [MaybeUninit<f64>]) {
    let max = x[..=i].iter().fold(f64::NEG_INFINITY, |m, v| m.max(v * scale));
    let mut sum = 0f64;
    for (o, v) in out.iter_mut().zip(&x[..=i]) {
        let e = (v * scale - max).exp();
        sum += e;
        o.write(e);
    }
    for o in &mut out[..=i] {
        // SAFETY: written just above.
        let e = unsafe { o.assume_init() };
        o.write(e / sum);
    }
    for o in &mut out[i + 1..] {
        o.write(0.0);
    }
}

/// `n` outputs from `fill(first_row, rows)` over tasks of whole rows (`t` wide), in parallel when
/// there are several tasks. `fill` must write every element of its rows.
fn par_fill_rows<U: Send>(n: usize, t: usize, fill: impl Fn(usize, &mut [MaybeUninit<U>]) + Sync) -> Vec<U> {
    let mut out = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    let task = (CHUNK / t).max(1) * t;
    if n <= task {
        fill(0, spare);
    } else {
        spare.par_chunks_mut(task).enumerate().for_each(|(k, rows)| fill(k * task / t, rows));
    }
    // SAFETY: `fill` wrote every element of every row (the tasks cover all `n`).
    unsafe { out.set_len(n) };
    out
}

impl CausalSoftmax {
    fn rows<T: Narrow>(&self, x: &[T], t: usize) -> Vec<T> {
        let scale = self.scale as f32;
        par_fill_rows(x.len(), t, |first, rows| causal_rows(x, t, first, scale, rows))
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle::bail!("causal-softmax: the scores are not contiguous");
        };
        let t = layout.dims().last().copied().unwrap_or(1).max(1);
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.rows(&v[start..end], t)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.rows(&v[start..end], t)),
            CpuStorage::F16(v) => CpuStorage::F16(self.rows(&v[start..end], t)),
            CpuStorage::F64(v) => {
                let x = &v[start..end];
                CpuStorage::F64(par_fill_rows(x.len(), t, |first, rows| {
                    for (k, row) in rows.chunks_mut(t).enumerate() {
                        let r = first + k;
                        causal_row_f64(&x[r * t..(r + 1) * t], r % t, self.scale, row);
                    }
                }))
            }
            other => candle::bail!("causal-softmax: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        crate::layers::ops::softmax_backward(y, g, self.scale).map(Some)
    }
}

/// One operand of [`matmul`] in its storage: the touched range, the step between batch
/// matrices and the row and column strides.
struct Operand {
    start: usize,
    end: usize,
    skip: usize,
    rs: isize,
    cs: isize,
}

impl Operand {
    /// `None` for a layout whose batch dimensions do not collapse into one stride (Candle's
    /// matmul then decides), or an empty one.
    fn of(layout: &Layout) -> Option<Self> {
        let (dims, stride) = (layout.dims(), layout.stride());
        let rank = dims.len();
        let (rows, cols) = (dims[rank - 2], dims[rank - 1]);
        let batch: usize = dims[..rank - 2].iter().product();
        if batch == 0 || rows == 0 || cols == 0 {
            return None;
        }
        let skip = if rank == 2 {
            rows * cols
        } else {
            let collapses = (0..rank - 3).all(|i| stride[i] == stride[i + 1] * dims[i + 1]);
            if !collapses {
                return None;
            }
            stride[rank - 3]
        };
        let (rs, cs) = (stride[rank - 2], stride[rank - 1]);
        let start = layout.start_offset();
        let end = start + (batch - 1) * skip + (rows - 1) * rs + (cols - 1) * cs + 1;
        Some(Self { start, end, skip, rs: rs as isize, cs: cs as isize })
    }
}

/// `batch` products `[m, k] x [k, n]` by `gemm` in F32 into a fresh contiguous buffer, with the
/// arguments Candle's CPU matmul passes (so the same values), but no zero-filled destination:
/// with `read_dst` false, `gemm` treats `alpha` as 0 and writes every element of `dst` without
/// reading it (`gemm-common` 0.19: the micro-kernels' `alpha_status` 0, `gemv`/`gevv` likewise).
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    lhs: &[f32],
    a: &Operand,
    rhs: &[f32],
    b: &Operand,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let threads = candle::utils::get_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let mut dst: Vec<f32> = Vec::with_capacity(batch * m * n);
    for i in 0..batch {
        // SAFETY: the operands' ranges hold every element the strides reach (`Operand::of`
        // computed `end` from them; `lhs`/`rhs` start at `start`); `dst` has room for `batch`
        // row-major `[m, n]` results; `k > 0` (checked by the caller).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr().add(i * m * n),
                1,
                n as isize,
                false,
                lhs.as_ptr().add(i * a.skip),
                a.cs,
                a.rs,
                rhs.as_ptr().add(i * b.skip),
                b.cs,
                b.rs,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    // SAFETY: `gemm` wrote all `m * n` elements of each of the `batch` results (see above).
    unsafe { dst.set_len(batch * m * n) };
    dst
}

// Widening BF16 to F32 and rounding F32 to BF16 (`bf16_from_f32`), vectorised.
half_kernel!(widen_slice, widen_slice_generic, widen_slice_avx2, (src: &[T], dst: &mut [MaybeUninit<f32>]), {
    for (d, s) in dst.iter_mut().zip(src) {
        d.write(s.widen());
    }
});

half_kernel!(narrow_slice, narrow_slice_generic, narrow_slice_avx2, (src: &[f32], dst: &mut [MaybeUninit<T>]), {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(T::narrow(s));
    }
});

/// `a.matmul(b)` for CPU tensors of rank 2 or more with the same batch dimensions, without
/// zero-filling the result first: F32 through `gemm` (Candle's values: the same call); BF16 on
/// a CPU with the AVX-512 BF16 dot product through [`gemm_bf16`]'s kernel (products summed in
/// F32 and rounded once, in another order than Candle's F32 `gemm`: within the rounding of that
/// sum of Candle's values, subnormals flushed), elsewhere widened to F32 (only the range the
/// operand's layout touches), multiplied by `gemm` and rounded once in vectorised passes
/// (Candle's values; its BF16 matmul widens the whole storage and rounds with scalar `half`
/// calls). The result tracks no gradient: only for values computed outside the graph (a custom
/// op's forward or backward). Candle's matmul elsewhere (other devices and dtypes, broadcast
/// batches, odd layouts).
///
/// # Errors
/// On a shape mismatch (Candle's error).
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match matmul_cpu(a, b, gemm_bf16::available())? {
        Some(c) => Ok(c),
        None => a.matmul(b),
    }
}

/// [`matmul`] on the CPU, BF16 through the AVX-512 BF16 kernel when `bf16_kernel` (the CPU has
/// it), else widened; `None` where Candle's matmul decides.
fn matmul_cpu(a: &Tensor, b: &Tensor, bf16_kernel: bool) -> Result<Option<Tensor>> {
    let rank = a.rank();
    if !a.device().is_cpu() || a.dtype() != b.dtype() || rank < 2 || b.rank() != rank {
        return Ok(None);
    }
    let (ad, bd) = (a.dims(), b.dims());
    let (m, k, n) = (ad[rank - 2], ad[rank - 1], bd[rank - 1]);
    if ad[..rank - 2] != bd[..rank - 2] || bd[rank - 2] != k || k == 0 {
        return Ok(None);
    }
    let batch: usize = ad[..rank - 2].iter().product();
    let mut out_dims = ad[..rank - 2].to_vec();
    out_dims.extend([m, n]);
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Some(oa), Some(ob)) = (Operand::of(la), Operand::of(lb)) else {
        return Ok(None);
    };
    let widen = |v: &[half::bf16], o: &Operand| -> Vec<f32> {
        par_fill(o.end - o.start, |i, out| widen_slice(&v[o.start + i..], out))
    };
    let product = match (&*sa, &*sb) {
        (Storage::Cpu(CpuStorage::F32(x)), Storage::Cpu(CpuStorage::F32(y))) => {
            let c = gemm_f32(&x[oa.start..oa.end], &oa, &y[ob.start..ob.end], &ob, batch, m, n, k);
            Tensor::from_vec(c, out_dims, a.device())?
        }
        (Storage::Cpu(CpuStorage::BF16(x)), Storage::Cpu(CpuStorage::BF16(y))) if bf16_kernel => {
            let c = bf16_products(x, &oa, y, &ob, batch, m, n, k)?;
            Tensor::from_vec(c, out_dims, a.device())?
        }
        (Storage::Cpu(CpuStorage::BF16(x)), Storage::Cpu(CpuStorage::BF16(y))) => {
            let (xw, yw) = (widen(x, &oa), widen(y, &ob));
            let c = gemm_f32(&xw, &oa, &yw, &ob, batch, m, n, k);
            drop((xw, yw));
            let c: Vec<half::bf16> = par_fill(c.len(), |i, out| narrow_slice(&c[i..i + out.len()], out));
            Tensor::from_vec(c, out_dims, a.device())?
        }
        _ => return Ok(None),
    };
    Ok(Some(product))
}

/// `batch` BF16 products `[m, k] x [k, n]` by [`gemm_bf16`]'s kernel (the CPU has it: the
/// caller checked), rounded to BF16: one product split over the threads, or several side by
/// side.
#[allow(clippy::too_many_arguments)]
fn bf16_products(
    x: &[half::bf16],
    a: &Operand,
    y: &[half::bf16],
    b: &Operand,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
) -> Result<Vec<half::bf16>> {
    use half::slice::HalfFloatSliceExt;
    let (x, y) = (x.reinterpret_cast(), y.reinterpret_cast());
    fn mat<'a>(data: &'a [u16], o: &Operand, i: usize, rows: usize, cols: usize) -> gemm_bf16::Mat<'a> {
        gemm_bf16::Mat {
            data: &data[o.start + i * o.skip..o.end],
            rows,
            cols,
            rs: o.rs as usize,
            cs: o.cs as usize,
        }
    }
    let mut c: Vec<half::bf16> = Vec::with_capacity(batch * m * n);
    let out = &mut c.spare_capacity_mut()[..batch * m * n];
    let done = if batch == 1 {
        gemm_bf16::gemm_bf16(mat(x, a, 0, m, k), mat(y, b, 0, k, n), out, true)
    } else {
        out.par_chunks_mut(m * n)
            .enumerate()
            .try_for_each(|(i, out)| gemm_bf16::gemm_bf16(mat(x, a, i, m, k), mat(y, b, i, k, n), out, false))
    };
    if done.is_none() {
        candle::bail!("matmul: the BF16 kernel refused [{m}, {k}] x [{k}, {n}] (an operand's layout)");
    }
    // SAFETY: the kernel wrote all `batch * m * n` elements.
    unsafe { c.set_len(batch * m * n) };
    Ok(c)
}

/// The float types layer normalisation computes in (F32, and F64 for the F64 reference).
trait Real:
    Copy
    + Send
    + Sync
    + WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// A stored dtype for results computed in `X`: F32/BF16/F16 from F32 (rounded once), F64 from
/// F64.
trait Store<X>: Copy + Send + Sync {
    fn put(value: X) -> Self;
    fn get(self) -> X;
}

impl<T: Narrow> Store<f32> for T {
    #[inline(always)]
    fn put(value: f32) -> Self {
        T::narrow(value)
    }
    #[inline(always)]
    fn get(self) -> f32 {
        self.widen()
    }
}

impl Store<f64> for f64 {
    #[inline(always)]
    fn put(value: f64) -> Self {
        value
    }
    #[inline(always)]
    fn get(self) -> f64 {
        self
    }
}

/// `sum(values)` in eight interleaved partial sums (so the loop vectorises), added at the end.
#[inline(always)]
fn lane_sum<X: Real>(values: impl Iterator<Item = X>) -> X {
    let mut lanes = [X::ZERO; 8];
    for (k, v) in values.enumerate() {
        lanes[k % 8] += v;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// Layer norm's forward on rows of `x` (each `w.len()` wide): `((x - mean) * rstd) * w + b` per
/// row with `rstd = 1 / sqrt(mean((x - mean)^2) + eps)`, the row's `(mean, rstd)` into `stats`.
#[inline(always)]
fn ln_rows_forward<X: Real, T: Store<X>>(
    x: &[X],
    w: &[X],
    b: &[X],
    eps: X,
    out: &mut [MaybeUninit<T>],
    stats: &mut [(X, X)],
) {
    let c = w.len();
    let n = X::from_f64(c as f64);
    for ((row, o), stat) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)).zip(stats) {
        let mean = lane_sum(row.iter().copied()) / n;
        let var = lane_sum(row.iter().map(|&v| (v - mean) * (v - mean))) / n;
        let rstd = X::ONE / (var + eps).sqrt();
        for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(w).zip(b) {
            o.write(T::put((v - mean) * rstd * w + b));
        }
        *stat = (mean, rstd);
    }
}

/// Layer norm's backward on rows of `x` with their `stats` and output gradient `g`: the input
/// gradient `((g w - mean(g w)) - x̂ mean(g w x̂)) * rstd` into `gx`, and `g x̂` and `g` added
/// into `acc_w` and `acc_b` (the weight and bias gradients' partial sums over these rows).
#[inline(always)]
fn ln_rows_backward<X: Real, T: Store<X>>(
    x: &[X],
    g: &[T],
    w: &[X],
    stats: &[(X, X)],
    gx: &mut [MaybeUninit<X>],
    acc_w: &mut [X],
    acc_b: &mut [X],
) {
    let c = w.len();
    let n = X::from_f64(c as f64);
    let rows = x.chunks_exact(c).zip(g.chunks_exact(c)).zip(gx.chunks_exact_mut(c)).zip(stats);
    for (((row, grow), gxrow), &(mean, rstd)) in rows {
        let xhat = |v: X| (v - mean) * rstd;
        let mean_gw = lane_sum(grow.iter().zip(w).map(|(g, &w)| g.get() * w)) / n;
        let mean_gw_xhat =
            lane_sum(grow.iter().zip(w).zip(row).map(|((g, &w), &v)| g.get() * w * xhat(v))) / n;
        for ((((o, g), &w), &v), (aw, ab)) in
            gxrow.iter_mut().zip(grow).zip(w).zip(row).zip(acc_w.iter_mut().zip(acc_b.iter_mut()))
        {
            let (g, xh) = (g.get(), xhat(v));
            o.write(((g * w - mean_gw) - xh * mean_gw_xhat) * rstd);
            *aw += g * xh;
            *ab += g;
        }
    }
}

/// [`ln_rows_forward`] compiled with AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
// SAFETY (for callers): only called after detecting AVX2 and FMA.
unsafe fn ln_rows_forward_avx2<X: Real, T: Store<X>>(
    x: &[X],
    w: &[X],
    b: &[X],
    eps: X,
    out: &mut [MaybeUninit<T>],
    stats: &mut [(X, X)],
) {
    ln_rows_forward(x, w, b, eps, out, stats)
}

/// [`ln_rows_backward`] compiled with AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
// SAFETY (for callers): only called after detecting AVX2 and FMA.
unsafe fn ln_rows_backward_avx2<X: Real, T: Store<X>>(
    x: &[X],
    g: &[T],
    w: &[X],
    stats: &[(X, X)],
    gx: &mut [MaybeUninit<X>],
    acc_w: &mut [X],
    acc_b: &mut [X],
) {
    ln_rows_backward(x, g, w, stats, gx, acc_w, acc_b)
}

/// Whether the CPU has AVX2 and FMA (std caches the detection).
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The forward over all rows: the result and the per-row statistics. Rows in tasks of about
/// [`CHUNK`] values, in parallel.
fn ln_forward<X: Real, T: Store<X>>(x: &[X], w: &[X], b: &[X], eps: X) -> (Vec<T>, Vec<(X, X)>) {
    let c = w.len();
    let rows = x.len() / c;
    let mut out = Vec::with_capacity(x.len());
    let mut stats = vec![(X::ZERO, X::ZERO); rows];
    let task = (CHUNK / c).max(1);
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(task * c)
        .zip(stats.par_chunks_mut(task))
        .zip(x.par_chunks(task * c))
        .for_each(|((o, st), xs)| {
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { ln_rows_forward_avx2(xs, w, b, eps, o, st) };
            }
            ln_rows_forward(xs, w, b, eps, o, st)
        });
    // SAFETY: the tasks cover every row and each wrote every element of its rows.
    unsafe { out.set_len(x.len()) };
    (out, stats)
}

/// The backward over all rows: the input gradient and the weight and bias gradients, these
/// summed per block of [`SUM_BLOCK_ROWS`] rows (blocks in parallel) and then in block order,
/// so the result does not depend on the number of threads.
fn ln_backward<X: Real, T: Store<X>>(
    x: &[X],
    g: &[T],
    w: &[X],
    stats: &[(X, X)],
) -> (Vec<X>, Vec<X>, Vec<X>) {
    let c = w.len();
    let block = SUM_BLOCK_ROWS * c;
    let mut gx = Vec::with_capacity(x.len());
    let partials: Vec<(Vec<X>, Vec<X>)> = gx.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(g.par_chunks(block)))
        .zip(stats.par_chunks(SUM_BLOCK_ROWS))
        .map(|((o, (xs, gs)), st)| {
            let (mut acc_w, mut acc_b) = (vec![X::ZERO; c], vec![X::ZERO; c]);
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                unsafe { ln_rows_backward_avx2(xs, gs, w, st, o, &mut acc_w, &mut acc_b) };
                return (acc_w, acc_b);
            }
            ln_rows_backward(xs, gs, w, st, o, &mut acc_w, &mut acc_b);
            (acc_w, acc_b)
        })
        .collect();
    // SAFETY: the blocks cover every row and each wrote every element of its rows.
    unsafe { gx.set_len(x.len()) };
    let (mut grad_w, mut grad_b) = (vec![X::ZERO; c], vec![X::ZERO; c]);
    for (pw, pb) in partials {
        for ((tw, tb), (w, b)) in grad_w.iter_mut().zip(grad_b.iter_mut()).zip(pw.into_iter().zip(pb)) {
            *tw += w;
            *tb += b;
        }
    }
    (gx, grad_w, grad_b)
}

/// A contiguous CPU tensor's values as a `Vec` of `X` (a copy).
fn values<X: WithDType>(t: &Tensor) -> Result<Vec<X>> {
    t.to_dtype(X::DTYPE)?.flatten_all()?.to_vec1::<X>()
}

/// Layer normalisation over the last dimension of a contiguous CPU `x` in F32 (result in F32,
/// BF16 or F16) or F64 (result in F64), with `w` and `b` (`[c]`, any float dtype, used in the
/// compute dtype): the forward in one pass per row, keeping only `x`, the result and each row's
/// mean and `1/std` in the graph, and the backward in one pass per row (input gradient, and the
/// weight and bias gradients summed per block of 64 rows, blocks added in order). The same
/// operations in the same order as the unfused ops in `layer_norm.rs` except the sums (eight
/// partial sums per row here): equal to them to the rounding of the sums. `None` where it does
/// not apply (other devices, dtypes, layouts).
///
/// # Errors
/// On a tensor error.
pub(crate) fn layer_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let Some((value, backward)) = layer_norm_detached(x, w, b, eps, dtype)? else {
        return Ok(None);
    };
    crate::layers::custom_grad::custom3("layer-norm", x, w, b, value, move |x, w, b, _, g| {
        let (grad_x, grad_w, grad_b) = backward(x, w, b, g)?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    })
    .map(Some)
}

/// The backward of a layer norm computed outside the graph ([`layer_norm_detached`]): the
/// gradients of `x`, `w` and `b` from `(x, w, b, g)`, `g` the result's gradient.
pub(crate) type LayerNormBackward = std::sync::Arc<
    dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)> + Send + Sync,
>;

/// [`layer_norm`]'s value computed outside the graph, with its backward, for fused ops that
/// start with a layer norm; `None` where [`layer_norm`] does not apply.
///
/// # Errors
/// On a tensor error.
pub(crate) fn layer_norm_detached(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    dtype: DType,
) -> Result<Option<(Tensor, LayerNormBackward)>> {
    let c = x.dims().last().copied().unwrap_or(0);
    let applies = x.device().is_cpu()
        && x.is_contiguous()
        && c > 0
        && w.dims() == [c]
        && b.dims() == [c]
        && matches!(
            (x.dtype(), dtype),
            (DType::F32, DType::F32 | DType::BF16 | DType::F16) | (DType::F64, DType::F64)
        );
    if !applies {
        return Ok(None);
    }
    let parts = match (x.dtype(), dtype) {
        (DType::F64, _) => layer_norm_parts::<f64, f64>(x, w, b, eps),
        (_, DType::F32) => layer_norm_parts::<f32, f32>(x, w, b, eps),
        (_, DType::BF16) => layer_norm_parts::<f32, half::bf16>(x, w, b, eps),
        _ => layer_norm_parts::<f32, half::f16>(x, w, b, eps),
    };
    parts.map(Some)
}

/// The forward (the result, from `x`'s storage) and the backward of [`layer_norm`].
fn layer_norm_parts<X: Real, T: Store<X> + WithDType>(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, LayerNormBackward)> {
    let (w32, b32) = (values::<X>(&w.detach())?, values::<X>(&b.detach())?);
    let (value, stats) = {
        let Some((storage, start, end)) = cpu_slice(x) else {
            candle::bail!("layer-norm: not a contiguous CPU tensor")
        };
        let Some(xs) = X::cpu_storage_as_slice(match &*storage {
            Storage::Cpu(s) => s,
            _ => candle::bail!("layer-norm: not a CPU tensor"),
        })
        .ok() else {
            candle::bail!("layer-norm: unexpected dtype")
        };
        let (out, stats) = ln_forward::<X, T>(&xs[start..end], &w32, &b32, X::from_f64(eps));
        (Tensor::from_vec(out, x.shape(), x.device())?, stats)
    };
    let backward =
        move |x: &Tensor, w: &Tensor, b: &Tensor, g: &Tensor| -> Result<(Tensor, Tensor, Tensor)> {
            let g = g.contiguous()?;
            let (Some((xs_storage, x0, x1)), Some((gs_storage, g0, g1))) = (cpu_slice(x), cpu_slice(&g))
            else {
                candle::bail!("layer-norm backward: not contiguous CPU tensors")
            };
            let (Storage::Cpu(xc), Storage::Cpu(gc)) = (&*xs_storage, &*gs_storage) else {
                candle::bail!("layer-norm backward: not CPU tensors")
            };
            let (xs, gs) = (&X::cpu_storage_as_slice(xc)?[x0..x1], &T::cpu_storage_as_slice(gc)?[g0..g1]);
            let (gx, gw, gb) = ln_backward::<X, T>(xs, gs, &w32, &stats);
            let device = x.device();
            let grad_x = Tensor::from_vec(gx, x.shape(), device)?;
            let grad_w = Tensor::from_vec(gw, w.shape(), device)?.to_dtype(w.dtype())?;
            let grad_b = Tensor::from_vec(gb, b.shape(), device)?.to_dtype(b.dtype())?;
            Ok((grad_x, grad_w, grad_b))
        };
    Ok((value, std::sync::Arc::new(backward)))
}

#[cfg(test)]
mod tests {
    use candle::{Device, Var};

    use super::*;

    /// Normal values times `scale`, from a fixed seed.
    fn random(shape: &[usize], scale: f64, seed: u64) -> Result<Tensor> {
        let mut rng = candle_ckpt::Rng::seeded(seed);
        let values: Vec<f64> = (0..shape.iter().product()).map(|_| rng.normal_f64() * scale).collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
    }

    fn max_abs(t: &Tensor) -> Result<f64> {
        t.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
    }

    /// max |a - b| / max(1, max |b|).
    fn relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
        let diff = max_abs(&(a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?)?;
        Ok(diff / max_abs(b)?.max(1.0))
    }

    /// The branch-free exp within 2 ulp (2.4e-7 relative) of `f64::exp` over its range.
    #[test]
    fn the_branch_free_exp_is_within_2_ulp() {
        let mut worst = (0f64, 0f32);
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let exact = f64::from(x).exp();
            let error = (f64::from(exp_f32(x)) - exact).abs() / exact;
            if error > worst.0 {
                worst = (error, x);
            }
        }
        assert!(worst.0 < 2.4e-7, "error {:e} at {}", worst.0, worst.1);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(f32::NEG_INFINITY) < 2e-38);
    }

    #[test]
    fn the_rational_tanh_is_within_5e_7_of_tanh() {
        let mut worst = (0f64, 0f32);
        for i in -200_000..=200_000 {
            let x = i as f32 * 5e-5; // [-10, 10]
            let error = (f64::from(tanh_f32(x)) - f64::from(x).tanh()).abs();
            if error > worst.0 {
                worst = (error, x);
            }
        }
        assert!(worst.0 < 5e-7, "error {:e} at {}", worst.0, worst.1);
        assert_eq!(tanh_f32(f32::INFINITY), 1.0);
        assert_eq!(tanh_f32(-1e30), -1.0);
        assert!(tanh_f32(f32::NAN).is_nan());
    }

    /// The fused forward and backward against Candle's `gelu` and its backward (the unfused
    /// ops), with sizes below and above one parallel chunk (and not a multiple of it). Candle's
    /// backward rounds its constants to 6 digits (0.797885, 0.0356774): 1e-5 relative covers
    /// that; F32 against F32 also within 1e-5.
    #[test]
    fn fused_gelu_equals_candles_gelu_forward_and_backward() -> Result<()> {
        for n in [7, 1000, 3 * CHUNK + 5] {
            for dtype in [DType::F64, DType::F32] {
                let x = Var::from_tensor(&random(&[n], 3.0, 1)?.to_dtype(dtype)?)?;
                let r = random(&[n], 1.0, 2)?.to_dtype(dtype)?;
                let fused = gelu_tanh(x.as_tensor())?;
                let unfused = x.as_tensor().gelu()?;
                let forward_error = relative_error(&fused, &unfused)?;
                let tolerance = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
                assert!(forward_error < tolerance, "{dtype:?} n={n}: forward {forward_error:e}");
                let gf = (fused * &r)?.sum_all()?.backward()?;
                let gu = (unfused * &r)?.sum_all()?.backward()?;
                let (gf, gu) = (gf.get(x.as_tensor()), gu.get(x.as_tensor()));
                let (Some(gf), Some(gu)) = (gf, gu) else { candle::bail!("no gradient") };
                let backward_error = relative_error(gf, gu)?;
                assert!(backward_error < 1e-5, "{dtype:?} n={n}: backward {backward_error:e}");
            }
        }
        Ok(())
    }

    /// Half-precision inputs compute in F32 and round once: within one rounding of the F32
    /// result (BF16 2^-8, F16 2^-11, relative to the largest value).
    #[test]
    fn fused_gelu_in_half_precision_rounds_the_f32_result() -> Result<()> {
        let n = 2 * CHUNK + 3;
        for (dtype, tolerance) in [(DType::BF16, 8e-3), (DType::F16, 1e-3)] {
            let x = Var::from_tensor(&random(&[n], 3.0, 3)?.to_dtype(dtype)?)?;
            let g = random(&[n], 1.0, 4)?.to_dtype(dtype)?;
            let x32 = x.as_tensor().to_dtype(DType::F32)?;
            let forward = gelu_tanh(x.as_tensor())?;
            assert_eq!(forward.dtype(), dtype);
            assert!(relative_error(&forward, &gelu_tanh(&x32)?)? < tolerance);
            let grads = (gelu_tanh(x.as_tensor())? * &g)?.sum_all()?.backward()?;
            let Some(grad) = grads.get(x.as_tensor()) else { candle::bail!("no gradient") };
            let reference = gelu_tanh_backward_cpu(&x32, &g.to_dtype(DType::F32)?)?
                .ok_or_else(|| candle::Error::Msg("no CPU path".into()))?;
            assert!(relative_error(grad, &reference)? < tolerance, "{dtype:?}");
        }
        Ok(())
    }

    /// Central differences in F64 (h = 1e-6, accurate to about 1e-9 here).
    #[test]
    fn fused_gelu_matches_finite_differences() -> Result<()> {
        let x = random(&[64], 3.0, 5)?.to_vec1::<f64>()?;
        let r = random(&[64], 1.0, 6)?;
        let var = Var::from_slice(&x, 64, &Device::Cpu)?;
        let grads = (gelu_tanh(var.as_tensor())? * &r)?.sum_all()?.backward()?;
        let Some(analytic) = grads.get(var.as_tensor()) else { candle::bail!("no gradient") };
        let analytic = analytic.to_vec1::<f64>()?;
        let r = r.to_vec1::<f64>()?;
        let h = 1e-6;
        for i in 0..x.len() {
            let numeric = r[i] * (gelu_f64(x[i] + h) - gelu_f64(x[i] - h)) / (2.0 * h);
            // The objective through the op itself, not the scalar formula alone.
            let shifted = |d: f64| -> Result<f64> {
                let mut v = x.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, 64, &Device::Cpu)?;
                (gelu_tanh(&t)? * Tensor::from_slice(&r, 64, &Device::Cpu)?)?.sum_all()?.to_scalar::<f64>()
            };
            let through_op = (shifted(h)? - shifted(-h)?) / (2.0 * h);
            for reference in [numeric, through_op] {
                let error = (analytic[i] - reference).abs();
                assert!(error <= 1e-6 * (1.0 + reference.abs()), "x[{i}]: {} vs {reference}", analytic[i]);
            }
        }
        Ok(())
    }

    /// The branch-free BF16 rounding is `half`'s bit for bit: every sign, exponent and top
    /// mantissa pattern (all 65,536 upper halves) with lower halves at and around the rounding
    /// tie (ties to even both ways, just above and below), NaNs, infinities and subnormals.
    #[test]
    fn branch_free_bf16_rounding_equals_halfs() {
        for upper in 0..=u16::MAX {
            for lower in [0u16, 1, 0x7fff, 0x8000, 0x8001, 0xc000, 0xffff] {
                let value = f32::from_bits(u32::from(upper) << 16 | u32::from(lower));
                let (ours, theirs) = (bf16_from_f32(value), half::bf16::from_f32(value));
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{value:e} ({:#010x})", value.to_bits());
            }
        }
    }

    /// The one-pass softmax backward across several parallel tasks (774 rows of 129) against
    /// the tensor-op formula in F64 (1e-12), and BF16/F16 within one rounding of the formula on
    /// the same rounded inputs.
    #[test]
    fn softmax_backward_over_parallel_rows_equals_the_formula() -> Result<()> {
        let t = 129;
        let logits = random(&[2, 3, t, t], 2.0, 14)?;
        let y = crate::layers::ops::softmax_last_dim(&logits)?;
        let g = random(&[2, 3, t, t], 1.0, 15)?;
        let scale = 0.37;
        for (dtype, tolerance) in
            [(DType::F64, 1e-12), (DType::F32, 1e-6), (DType::BF16, 8e-3), (DType::F16, 1e-3)]
        {
            let (yd, gd) = (y.to_dtype(dtype)?, g.to_dtype(dtype)?);
            let Some(fused) = softmax_backward(&yd, &gd, scale)? else { candle::bail!("no CPU path") };
            assert_eq!(fused.dtype(), dtype);
            let (y64, g64) = (yd.to_dtype(DType::F64)?, gd.to_dtype(DType::F64)?);
            let dot = (&g64 * &y64)?.sum_keepdim(candle::D::Minus1)?;
            let expected = ((g64.broadcast_sub(&dot)? * &y64)? * scale)?;
            let error = relative_error(&fused, &expected)?;
            let size = max_abs(&expected)?;
            assert!(size > 1e-3 && error <= tolerance * size, "{dtype:?}: {error:e} of {size:e}");
        }
        Ok(())
    }

    /// The value and the gradients of `x`, `w` and `b` under the loss `sum(y * r)`.
    fn ln_run(
        x: &Var,
        w: &Var,
        b: &Var,
        r: &Tensor,
        dtype: DType,
        fused: bool,
    ) -> Result<(Tensor, [Tensor; 3])> {
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let y = if fused {
            layer_norm(xt, wt, bt, 1e-5, dtype)?.ok_or_else(|| candle::Error::Msg("no CPU path".into()))?
        } else {
            crate::layers::layer_norm::layer_norm_unfused(xt, wt, bt, 1e-5, dtype)?
        };
        let grads = (y.to_dtype(DType::F64)? * r)?.sum_all()?.backward()?;
        let get = |t: &Tensor| grads.get(t).cloned().ok_or_else(|| candle::Error::Msg("no gradient".into()));
        Ok((y, [get(xt)?, get(wt)?, get(bt)?]))
    }

    /// The fused layer norm against the unfused ops (`layer_norm_unfused`) over rows spanning
    /// several parallel tasks and weight-gradient blocks (2 x 150 rows of 72): F32 within 1e-6
    /// (value) and 1e-5 (gradients) of the largest value, a BF16 result (with F32 or BF16
    /// weights) within one BF16 rounding (and its gradients, from the same BF16 upstream
    /// gradient, within 1e-5, or one rounding where they are BF16).
    #[test]
    fn fused_layer_norm_equals_the_unfused_ops() -> Result<()> {
        let (shape, c) = ([2, 150, 72], 72);
        let r = random(&shape, 1.0, 20)?;
        for (out, params, value_tol, grad_tol) in [
            (DType::F32, DType::F32, 1e-6, 1e-5),
            (DType::BF16, DType::F32, 8e-3, 1e-5),
            (DType::BF16, DType::BF16, 8e-3, 8e-3),
        ] {
            let x = Var::from_tensor(&random(&shape, 2.0, 21)?.affine(1.0, 0.5)?.to_dtype(DType::F32)?)?;
            let w = Var::from_tensor(&random(&[c], 0.5, 22)?.affine(1.0, 1.0)?.to_dtype(params)?)?;
            let b = Var::from_tensor(&random(&[c], 0.5, 23)?.to_dtype(params)?)?;
            let (yf, gf) = ln_run(&x, &w, &b, &r, out, true)?;
            let (yu, gu) = ln_run(&x, &w, &b, &r, out, false)?;
            assert_eq!(yf.dtype(), out);
            let error = relative_error(&yf, &yu)?;
            assert!(error <= value_tol, "{out:?}/{params:?} value: {error:e}");
            for (name, (f, u)) in ["x", "w", "b"].iter().zip(gf.iter().zip(&gu)) {
                assert_eq!((f.dtype(), f.dims()), (u.dtype(), u.dims()), "{name}");
                let error = relative_error(f, u)?;
                let tolerance = if *name == "x" { 1e-5 } else { grad_tol };
                assert!(
                    max_abs(u)? > 1e-2 && error <= tolerance,
                    "{out:?}/{params:?} grad {name}: {error:e}"
                );
            }
        }
        Ok(())
    }

    /// The fused layer norm's F64 gradients of `x`, `w` and `b` against central differences of
    /// the loss through the op (h = 1e-5: error about 1e-10).
    #[test]
    fn fused_layer_norm_matches_finite_differences() -> Result<()> {
        let (shape, c) = ([3, 4, 6], 6);
        let r = random(&shape, 1.0, 24)?;
        let x0 = random(&shape, 1.5, 25)?;
        let w0 = random(&[c], 0.5, 26)?.affine(1.0, 1.0)?;
        let b0 = random(&[c], 0.5, 27)?;
        let (x, w, b) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?, Var::from_tensor(&b0)?);
        let (_, grads) = ln_run(&x, &w, &b, &r, DType::F64, true)?;
        crate::layers::assert_finite_differences(&[x0, w0, b0], &grads, |args| {
            let y = layer_norm(&args[0], &args[1], &args[2], 1e-5, DType::F64)?
                .ok_or_else(|| candle::Error::Msg("no CPU path".into()))?;
            (y * &r)?.sum_all()?.to_scalar::<f64>()
        })?;
        Ok(())
    }

    /// `matmul` against Candle's matmul bit for bit in F32 and BF16: plain, transposed operands
    /// (views of contiguous storage), a batch of 2 x 3 matrices, a view into the middle of a
    /// storage; sizes on both sides of `gemm`'s small-matrix path. F64 takes Candle's path.
    #[test]
    fn matmul_equals_candles_matmul() -> Result<()> {
        for (m, k, n) in [(3, 5, 4), (70, 33, 65)] {
            for dtype in [DType::F32, DType::BF16, DType::F64] {
                let a = random(&[2, 3, m, k], 1.0, 30)?.to_dtype(dtype)?;
                let b = random(&[2, 3, k, n], 1.0, 31)?.to_dtype(dtype)?;
                let at = random(&[2, 3, k, m], 1.0, 32)?.to_dtype(dtype)?.transpose(2, 3)?;
                let bt = random(&[2, 3, n, k], 1.0, 33)?.to_dtype(dtype)?.transpose(2, 3)?;
                let wide = random(&[m, k + 7], 1.0, 34)?.to_dtype(dtype)?;
                let middle = wide.narrow(1, 3, k)?;
                let b2 = b.get(1)?.get(2)?;
                let cases = [(&a, &b), (&at, &b), (&a, &bt), (&at, &bt), (&middle, &b2)];
                for (i, (x, y)) in cases.into_iter().enumerate() {
                    // The portable path (BF16 widened, as on CPUs without the BF16 kernel); F64 is
                    // Candle's own.
                    let ours = match dtype {
                        DType::F64 => matmul(x, y)?,
                        _ => matmul_cpu(x, y, false)?.expect("a layout the kernels take"),
                    };
                    let theirs = x.matmul(y)?;
                    assert_eq!(ours.dims(), theirs.dims());
                    let diff = max_abs(&(ours.to_dtype(DType::F64)? - theirs.to_dtype(DType::F64)?)?)?;
                    assert_eq!(diff, 0.0, "{dtype:?} {m}x{k}x{n} case {i}");
                    assert!(max_abs(&ours)? > 0.1);
                }
            }
        }
        Ok(())
    }

    /// The AVX-512 BF16 kernel's products against the exact ones (F64 sums of the same BF16
    /// values): each result within the F32 rounding of its sum (`k` roundings of at most 2^-24
    /// of the running sum's magnitude, bounded by the sum of `|a b|`) plus one BF16 rounding
    /// (2^-8 relative) of the value, on transposed, strided and batched layouts, odd and
    /// panel-crossing shapes; and within the same bound of Candle's matmul. Skipped (with a
    /// message) on CPUs without the instruction.
    #[test]
    fn bf16_kernel_matmul_is_within_one_rounding_of_the_exact_product() -> Result<()> {
        if !gemm_bf16::cpu_has_instructions() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return Ok(());
        }
        let bf16 = DType::BF16;
        // Odd `k` (packed left operands) and even (row-major ones read in place), one and
        // several blocks of `k`.
        let shapes =
            [(1, 1, 1), (3, 5, 4), (13, 33, 65), (13, 34, 65), (25, 64, 70), (5, 2 * gemm_bf16::KC + 2, 3)];
        for (m, k, n) in shapes.into_iter().chain([(70, 2 * gemm_bf16::KC + 3, 37)]) {
            let a = random(&[2, 3, m, k], 1.0, 30)?.to_dtype(bf16)?;
            let b = random(&[2, 3, k, n], 1.0, 31)?.to_dtype(bf16)?;
            let at = random(&[2, 3, k, m], 1.0, 32)?.to_dtype(bf16)?.transpose(2, 3)?;
            let bt = random(&[2, 3, n, k], 1.0, 33)?.to_dtype(bf16)?.transpose(2, 3)?;
            let middle = random(&[m, k + 7], 1.0, 34)?.to_dtype(bf16)?.narrow(1, 3, k)?;
            let b2 = b.get(1)?.get(2)?;
            let cases = [(&a, &b), (&at, &b), (&a, &bt), (&at, &bt), (&middle, &b2)];
            for (i, (x, y)) in cases.into_iter().enumerate() {
                let ours = matmul_cpu(x, y, true)?.expect("a layout the kernels take");
                assert_eq!(ours.dtype(), bf16);
                let (x64, y64) = (x.to_dtype(DType::F64)?, y.to_dtype(DType::F64)?);
                let exact = x64.matmul(&y64)?;
                let magnitudes = x64.abs()?.matmul(&y64.abs()?)?;
                let bound = ((exact.abs()? * 2f64.powi(-8))? + (magnitudes * (k as f64 * 2f64.powi(-24)))?)?;
                let ours = ours.to_dtype(DType::F64)?;
                let excess = ((&ours - &exact)?.abs()? - &bound)?.flatten_all()?.max(0)?;
                assert!(excess.to_scalar::<f64>()? <= 0.0, "{m}x{k}x{n} case {i}");
                let candle = x.matmul(y)?.to_dtype(DType::F64)?;
                let excess = ((&ours - &candle)?.abs()? - (bound * 2.0)?)?.flatten_all()?.max(0)?;
                assert!(excess.to_scalar::<f64>()? <= 0.0, "{m}x{k}x{n} case {i} against Candle");
                assert!(max_abs(&ours)? > 0.1);
            }
        }
        Ok(())
    }

    /// The in-place bias add is `broadcast_add` bit for bit; a tracked tensor is not written.
    #[test]
    fn in_place_bias_add_equals_broadcast_add() -> Result<()> {
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            for (rows, n) in [(3, 5), (1000, 48)] {
                let y = random(&[rows, n], 1.0, 7)?.to_dtype(dtype)?;
                let b = random(&[n], 1.0, 8)?.to_dtype(dtype)?;
                let expected = y.broadcast_add(&b)?;
                let fused = add_bias_owned(y.copy()?, &b)?;
                let diff = max_abs(&(fused.to_dtype(DType::F64)? - expected.to_dtype(DType::F64)?)?)?;
                assert_eq!(diff, 0.0, "{dtype:?} {rows}x{n}");
            }
        }
        let tracked = Var::from_tensor(&random(&[2, 3], 1.0, 9)?.to_dtype(DType::F32)?)?;
        let before = tracked.as_tensor().to_vec2::<f32>()?;
        let b = Tensor::ones(3, DType::F32, &Device::Cpu)?;
        let _sum = add_bias_owned(tracked.as_tensor().clone(), &b)?;
        assert_eq!(tracked.as_tensor().to_vec2::<f32>()?, before);
        Ok(())
    }

    /// The one-pass bias gradient against Candle's `sum(0)` in F32 (F64 for F64): rows below and
    /// above one block, and not a multiple of it.
    #[test]
    fn bias_grad_equals_the_sum_over_rows() -> Result<()> {
        for (rows, n) in [(1, 4), (63, 9), (2048 + 17, 130)] {
            let g = random(&[rows, n], 1.0, 10)?;
            for (dtype, tolerance) in [(DType::F64, 1e-13), (DType::F32, 1e-6), (DType::BF16, 1e-6)] {
                let g = g.to_dtype(dtype)?;
                let rd = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
                let expected = g.to_dtype(rd)?.sum(0)?;
                let fused = bias_grad(&g, rd)?;
                assert_eq!(fused.dtype(), rd);
                // Relative to the sum of magnitudes (the scale of the rounding errors).
                let scale = g.to_dtype(DType::F64)?.abs()?.sum(0)?.max(0)?.to_scalar::<f64>()?;
                let diff = max_abs(&(fused.to_dtype(DType::F64)? - expected.to_dtype(DType::F64)?)?)?;
                assert!(diff <= tolerance * scale, "{dtype:?} {rows}x{n}: {diff:e}");
            }
        }
        Ok(())
    }

    /// The fused dropout draws the same mask as the unfused one (one `uniform_f32` per element,
    /// in order, across parallel chunks) and gives the same values and gradient bit for bit;
    /// the generator ends where the unfused path leaves it.
    #[test]
    fn fused_dropout_equals_the_mask_multiply() -> Result<()> {
        let p = 0.3f32;
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            for n in [5, 3 * CHUNK + 1] {
                let x = Var::from_tensor(&random(&[n], 1.0, 11)?.to_dtype(dtype)?)?;
                let g = random(&[n], 1.0, 12)?.to_dtype(dtype)?;
                let mut fused_rng = candle_ckpt::Rng::seeded(5);
                let Some(fused) = dropout(x.as_tensor(), p, &mut fused_rng)? else {
                    candle::bail!("no CPU path")
                };
                // The unfused path of `Dropout::forward`.
                let mut rng = candle_ckpt::Rng::seeded(5);
                let keep_scale = 1.0 / (1.0 - f64::from(p));
                let mut draw = || if rng.uniform_f32() < p { 0.0 } else { keep_scale };
                let mask = if dtype == DType::F64 {
                    Tensor::from_vec((0..n).map(|_| draw()).collect::<Vec<f64>>(), n, &Device::Cpu)?
                } else {
                    let values: Vec<f32> = (0..n).map(|_| draw() as f32).collect();
                    Tensor::from_vec(values, n, &Device::Cpu)?.to_dtype(dtype)?
                };
                let unfused = x.as_tensor().mul(&mask)?;
                assert_eq!(fused_rng.next_u64(), rng.next_u64(), "{dtype:?}: generator position");
                let bits = |t: &Tensor| -> Result<Vec<f64>> { t.to_dtype(DType::F64)?.to_vec1::<f64>() };
                assert_eq!(bits(&fused)?, bits(&unfused)?, "{dtype:?} n={n}: values");
                let dropped = bits(&fused)?.iter().filter(|v| **v == 0.0).count() as f64 / n as f64;
                assert!(n < 100 || (dropped - 0.3).abs() < 0.02, "{dtype:?}: dropped {dropped}");
                let gf = (fused * &g)?.sum_all()?.backward()?;
                let gu = (unfused * &g)?.sum_all()?.backward()?;
                let (Some(gf), Some(gu)) = (gf.get(x.as_tensor()), gu.get(x.as_tensor())) else {
                    candle::bail!("no gradient")
                };
                assert_eq!(bits(gf)?, bits(gu)?, "{dtype:?} n={n}: gradients");
            }
        }
        Ok(())
    }

    /// The one-pass causal softmax against the unfused ops it replaces (scale, additive -inf
    /// mask, `ops::softmax_last_dim` in F32/F64, cast back): F64 within 1e-12, F32 within 1e-6,
    /// BF16/F16 within one rounding of the result; rows of different lengths across several
    /// parallel tasks (t = 129, 2 x 3 heads).
    #[test]
    fn fused_causal_softmax_equals_the_unfused_ops() -> Result<()> {
        let t = 129;
        let scores = random(&[2, 3, t, t], 2.0, 13)?;
        let mask: Vec<f64> =
            (0..t * t).map(|i| if i % t > i / t { f64::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
        let scale = 0.37;
        for (dtype, tolerance) in
            [(DType::F64, 1e-12), (DType::F32, 1e-6), (DType::BF16, 8e-3), (DType::F16, 1e-3)]
        {
            let s = scores.to_dtype(dtype)?;
            let rd = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
            let shifted = (s.to_dtype(rd)? * scale)?.broadcast_add(&mask.to_dtype(rd)?)?;
            let unfused = crate::layers::ops::softmax_last_dim(&shifted)?.to_dtype(dtype)?;
            let Some(fused) = causal_softmax(&s, scale)? else { candle::bail!("no CPU path") };
            assert_eq!(fused.dtype(), dtype);
            let error = relative_error(&fused, &unfused)?;
            assert!(error <= tolerance, "{dtype:?}: {error:e}");
            // Above the diagonal exactly zero.
            let upper = fused.to_dtype(DType::F64)?.narrow(2, 0, 1)?.narrow(3, 1, t - 1)?;
            assert_eq!(max_abs(&upper)?, 0.0);
        }
        Ok(())
    }
}
