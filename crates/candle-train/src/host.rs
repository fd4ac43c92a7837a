//! Moving FP32 values between Candle tensors and host slices without needless copies: CPU
//! tensors are read and written in place; other devices go through a host copy.

use std::cell::RefCell;

use candle::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var};
use half::{bf16, f16};

use crate::error::{Error, Result};

fn mismatch(var: &Var, expected: &str, found: String) -> Error {
    Error::StateMismatch {
        name: format!("variable of shape {:?}", var.dims()),
        expected: expected.into(),
        found,
    }
}

/// Calls `f` with the tensor's values as FP32. A contiguous F32 CPU tensor is lent in place;
/// anything else is converted into a temporary host vector.
///
/// # Errors
/// On a conversion error.
pub fn with_f32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&data[start..end]));
        }
    }
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&values))
}

/// The tensor's values as a new FP32 vector.
///
/// # Errors
/// On a conversion error.
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    with_f32_values(t, <[f32]>::to_vec)
}

struct InPlace<F> {
    f: RefCell<F>,
}

impl<F: FnMut(&mut CpuStorage, usize, usize)> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "candle-train-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle::bail!("in-place parameter update needs a contiguous variable");
        };
        (self.f.borrow_mut())(storage, start, end);
        Ok(())
    }
}

/// Runs `f` on an F32 variable's values in place (CPU), or on a host copy written back with
/// `Var::set` (other devices).
///
/// # Errors
/// When the variable is not F32, or on a device error.
pub fn update_f32_in_place(var: &Var, f: impl FnOnce(&mut [f32])) -> Result<()> {
    if var.dtype() != DType::F32 {
        return Err(mismatch(var, "an F32 variable", format!("{:?}", var.dtype())));
    }
    if var.device().is_cpu() {
        let mut f = Some(f);
        let op = InPlace {
            f: RefCell::new(|storage: &mut CpuStorage, start: usize, end: usize| {
                if let (CpuStorage::F32(data), Some(f)) = (storage, f.take()) {
                    f(&mut data[start..end]);
                }
            }),
        };
        var.as_tensor().inplace_op1(&op)?;
        return Ok(());
    }
    let mut values = to_f32_vec(var.as_tensor())?;
    f(&mut values);
    var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
    Ok(())
}

/// Writes FP32 `values` into a variable of any float dtype, rounding to nearest even (as
/// Candle's `to_dtype`). In place on CPU.
///
/// # Errors
/// When the lengths differ, or on a device error.
pub fn write_f32_values(var: &Var, values: &[f32]) -> Result<()> {
    if values.len() != var.elem_count() {
        return Err(mismatch(
            var,
            &format!("{} values", var.elem_count()),
            format!("{} values", values.len()),
        ));
    }
    if var.device().is_cpu() {
        let op = InPlace {
            f: RefCell::new(|storage: &mut CpuStorage, start: usize, end: usize| match storage {
                CpuStorage::F32(d) => d[start..end].copy_from_slice(values),
                CpuStorage::BF16(d) => {
                    d[start..end].iter_mut().zip(values).for_each(|(o, &v)| *o = bf16::from_f32(v))
                }
                CpuStorage::F16(d) => {
                    d[start..end].iter_mut().zip(values).for_each(|(o, &v)| *o = f16::from_f32(v))
                }
                CpuStorage::F64(d) => d[start..end].iter_mut().zip(values).for_each(|(o, &v)| *o = v as f64),
                _ => {}
            }),
        };
        if !matches!(var.dtype(), DType::F32 | DType::BF16 | DType::F16 | DType::F64) {
            return Err(mismatch(var, "a float variable", format!("{:?}", var.dtype())));
        }
        var.as_tensor().inplace_op1(&op)?;
        return Ok(());
    }
    let t = Tensor::from_slice(values, var.shape(), &candle::Device::Cpu)?.to_dtype(var.dtype())?;
    var.set(&t.to_device(var.device())?)?;
    Ok(())
}
