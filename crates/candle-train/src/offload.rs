//! The CPU-offloaded optimizer step of [`crate::LocalUpdater`] (`--offload-optimizer`).
//!
//! Master weights, gradient accumulators and optimizer state live in host memory (in this
//! crate they always do: every optimizer steps host FP32 slices), and the step runs on the
//! host's cores through [`crate::optim::Optimizer::update_parallel`] (rayon over flat chunks of
//! a loop the compiler vectorizes). What offloading adds on a GPU:
//!
//! - F32 parameters get a host-resident FP32 copy, downloaded once, which the optimizer steps;
//!   the device copy is only written (uploaded) after each step, never read back. Without
//!   offloading, each step downloads the parameter, updates it and uploads it.
//! - Gradients are downloaded and parameters uploaded through page-locked (pinned) staging
//!   buffers, one per parameter, so the copies run at full PCIe speed (feature `cuda`).
//!
//! On the CPU device the state is already in host memory: offloading only makes the step
//! multi-threaded. The result is bit-identical to the single-threaded step on every device.

use candle::{Tensor, Var};

use crate::error::Result;
use crate::host::{to_f32_vec, with_f32_values, write_f32_values};

/// A parameter's page-locked staging buffer for CUDA transfers, allocated on first use
/// (nothing without the `cuda` feature).
#[cfg(feature = "cuda")]
type Staging = Option<crate::cuda::PinnedBuffer>;
#[cfg(not(feature = "cuda"))]
type Staging = ();

/// Host-side buffers of an offloaded optimizer, one slot per parameter (in the updater's order).
pub(crate) struct Offload {
    /// F32 parameters on a non-CPU device: their FP32 values in host memory, authoritative
    /// between steps (`None` until first needed, and after [`Offload::invalidate`]).
    resident: Vec<Option<Vec<f32>>>,
    staging: Vec<Staging>,
}

impl Offload {
    pub(crate) fn new(params: usize) -> Self {
        Self { resident: vec![None; params], staging: (0..params).map(|_| Staging::default()).collect() }
    }

    /// Forgets the host copies of device parameters: the next step reads them from the device
    /// again (after a checkpoint restore or any other write to the parameters).
    pub(crate) fn invalidate(&mut self) {
        self.resident.iter_mut().for_each(|r| *r = None);
    }

    /// Bytes of host memory held besides what a non-offloaded updater holds.
    pub(crate) fn bytes(&self) -> usize {
        let resident: usize = self.resident.iter().flatten().map(|r| r.len() * 4).sum();
        #[cfg(feature = "cuda")]
        let resident = resident + self.staging.iter().flatten().map(|b| b.len() * 4).sum::<usize>();
        resident
    }

    /// Adds parameter `index`'s gradient into `acc`, through its pinned buffer on CUDA.
    pub(crate) fn accumulate(&mut self, index: usize, grad: &Tensor, acc: &mut [f32]) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let candle::Device::Cuda(device) = grad.device() {
            let buffer = pinned_buffer(&mut self.staging[index], device, acc.len())?;
            buffer.download(grad)?;
            acc.iter_mut().zip(buffer.as_slice()?).for_each(|(a, &v)| *a += v);
            return Ok(());
        }
        let _ = index;
        with_f32_values(grad, |values| acc.iter_mut().zip(values).for_each(|(a, &v)| *a += v))
    }

    /// Steps F32 parameter `index`, held on a non-CPU device, through its host-resident FP32
    /// copy (downloaded on first use): `update` changes the copy, which is then uploaded.
    /// Returns the bytes moved (the upload, and the download on first use).
    pub(crate) fn update_resident(
        &mut self,
        index: usize,
        var: &Var,
        update: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> Result<u64> {
        let bytes = var.elem_count() as u64 * 4;
        let (values, moved) = match &mut self.resident[index] {
            Some(values) => (values, bytes),
            empty => (empty.insert(to_f32_vec(var.as_tensor())?), 2 * bytes),
        };
        update(values)?;
        upload(&mut self.staging[index], var, values)?;
        Ok(moved)
    }

    /// Writes updated FP32 `values` into parameter `index` (rounded to its dtype), through its
    /// pinned buffer on CUDA.
    pub(crate) fn write_back(&mut self, index: usize, var: &Var, values: &[f32]) -> Result<()> {
        upload(&mut self.staging[index], var, values)
    }
}

/// Writes FP32 `values` into `var`: in place on the CPU, through the pinned `staging` buffer
/// on CUDA.
fn upload(staging: &mut Staging, var: &Var, values: &[f32]) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let candle::Device::Cuda(device) = var.device() {
        let buffer = pinned_buffer(staging, device, values.len())?;
        buffer.as_mut_slice()?.copy_from_slice(values);
        let uploaded = buffer.upload(var.shape())?.to_dtype(var.dtype())?;
        var.set(&uploaded)?;
        return Ok(());
    }
    let _ = staging;
    write_f32_values(var, values)
}

/// The staging buffer in `slot`, (re)allocated for `len` values on `device` when needed.
#[cfg(feature = "cuda")]
fn pinned_buffer<'a>(
    slot: &'a mut Staging,
    device: &candle::CudaDevice,
    len: usize,
) -> Result<&'a mut crate::cuda::PinnedBuffer> {
    if slot.as_ref().is_some_and(|b| b.len() != len) {
        *slot = None;
    }
    match slot {
        Some(buffer) => Ok(buffer),
        empty => Ok(empty.insert(crate::cuda::PinnedBuffer::zeros(device, len)?)),
    }
}
