//! Everything CUDA-specific in candle-train (feature `cuda`): memory statistics from the
//! device's stream-ordered memory pool, and pinned host buffers for offload.
//!
//! Candle allocates through cudarc's stream-ordered allocator (`cuMemAllocAsync`), which serves
//! every allocation from the device's current memory pool. The pool keeps the bytes in use and
//! their high-water mark (`USED_MEM_CURRENT` / `USED_MEM_HIGH`): the exact equivalent of
//! `torch.cuda.memory_allocated` / `torch.cuda.max_memory_allocated`, and what
//! [`crate::memory::DeviceMeter`] reads on a CUDA device. Reserved bytes (what the pool holds
//! from the driver, PyTorch's `memory_reserved`) come beside them.
//!
//! Nothing here can run without a GPU; `tests/device_matrix.rs` exercises it on one and skips
//! with a message elsewhere.

use std::ffi::c_void;

use candle::cuda::cudarc::driver::{result, sys, CudaSlice, DriverError, PinnedHostSlice};
use candle::{CudaDevice, CudaStorage, Device, Shape, Storage, Tensor};

use crate::error::Result;

fn driver(e: DriverError) -> candle::Error {
    candle::Error::Cuda(Box::new(e))
}

/// The memory pool's counters, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes handed out to live allocations now (`memory_allocated`).
    pub used_current: usize,
    /// The most bytes handed out at once since the last [`reset_peak`] (`max_memory_allocated`).
    pub used_high: usize,
    /// Bytes the pool holds from the driver now (`memory_reserved`).
    pub reserved_current: usize,
    /// The most bytes the pool held since the last [`reset_peak`].
    pub reserved_high: usize,
}

/// The memory pool candle's allocations on `device` come from (the device's current pool).
fn pool(device: &CudaDevice) -> std::result::Result<sys::CUmemoryPool, DriverError> {
    let stream = device.cuda_stream();
    let context = stream.context();
    context.bind_to_thread()?;
    // SAFETY: `cu_device` is a device handle cudarc obtained from `cuDeviceGet`.
    unsafe { result::device::get_mem_pool(context.cu_device()) }
}

fn attribute(
    pool: sys::CUmemoryPool,
    attr: sys::CUmemPool_attribute,
) -> std::result::Result<usize, DriverError> {
    let mut value: u64 = 0;
    // SAFETY: the four byte-count attributes read here are `cuuint64_t`, and `value` is one.
    unsafe { result::mem_pool::get_attribute(pool, attr, (&mut value as *mut u64).cast::<c_void>())? };
    Ok(usize::try_from(value).unwrap_or(usize::MAX))
}

/// Reads the pool's counters after the device's queued work is done, so every allocation
/// enqueued so far is counted.
///
/// # Errors
/// A driver error (no context, no memory-pool support on the device).
pub fn pool_stats(device: &CudaDevice) -> Result<PoolStats> {
    use sys::CUmemPool_attribute as A;
    device.cuda_stream().synchronize().map_err(driver)?;
    let pool = pool(device).map_err(driver)?;
    let read = |attr| attribute(pool, attr).map_err(driver);
    Ok(PoolStats {
        used_current: read(A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
        used_high: read(A::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        reserved_current: read(A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        reserved_high: read(A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
    })
}

/// Starts a new peak measurement: both high-water marks drop to their current values (the
/// driver's rule for writing 0 to them). Returns the bytes in use now.
///
/// # Errors
/// As [`pool_stats`].
pub fn reset_peak(device: &CudaDevice) -> Result<usize> {
    use sys::CUmemPool_attribute as A;
    device.cuda_stream().synchronize().map_err(driver)?;
    let pool = pool(device).map_err(driver)?;
    for attr in [A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH] {
        let mut zero: u64 = 0;
        // SAFETY: the high-water attributes are `cuuint64_t` and may only be set to 0, as here.
        unsafe { result::mem_pool::set_attribute(pool, attr, (&mut zero as *mut u64).cast::<c_void>()) }
            .map_err(driver)?;
    }
    Ok(attribute(pool, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT).map_err(driver)?)
}

/// Free and total bytes of the whole device (`cuMemGetInfo`): what every process and every
/// pool leaves free, for reports beside the pool's exact counters.
///
/// # Errors
/// A driver error.
pub fn device_memory(device: &CudaDevice) -> Result<(usize, usize)> {
    let stream = device.cuda_stream();
    Ok(stream.context().mem_get_info().map_err(driver)?)
}

/// A page-locked host buffer of `f32`, the staging area of CPU offload: copies between it and
/// the GPU run at full PCIe speed and can overlap compute on the device's stream.
pub struct PinnedBuffer {
    device: CudaDevice,
    host: PinnedHostSlice<f32>,
}

impl std::fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBuffer").field("device", &self.device).field("len", &self.host.len()).finish()
    }
}

impl PinnedBuffer {
    /// `len` zeros in page-locked memory, usable with `device`'s stream.
    ///
    /// # Errors
    /// A driver error (page-locked memory is limited; asking for too much fails here).
    pub fn zeros(device: &CudaDevice, len: usize) -> Result<Self> {
        let stream = device.cuda_stream();
        // SAFETY: the memory is uninitialised until the fill below, and nothing reads it before.
        // Default flags (0), not write-combined: the host reads these buffers back.
        let mut host = unsafe { stream.context().alloc_pinned_with_flags::<f32>(len, 0) }.map_err(driver)?;
        host.as_mut_slice().map_err(driver)?.fill(0.0);
        Ok(Self { device: device.clone(), host })
    }

    /// The number of values.
    pub fn len(&self) -> usize {
        self.host.len()
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The values, after every copy queued on them has finished.
    ///
    /// # Errors
    /// A driver error from waiting on the copies.
    pub fn as_slice(&self) -> Result<&[f32]> {
        Ok(self.host.as_slice().map_err(driver)?)
    }

    /// The values for writing, after every copy queued on them has finished.
    ///
    /// # Errors
    /// As [`Self::as_slice`].
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        Ok(self.host.as_mut_slice().map_err(driver)?)
    }

    /// Copies the values into a new F32 tensor of `shape` on the buffer's device (a constant:
    /// no gradient is tracked through it).
    ///
    /// # Errors
    /// A shape whose element count differs from [`Self::len`], or a driver error.
    pub fn upload(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != self.len() {
            return Err(candle::Error::ShapeMismatchBinaryOp {
                lhs: Shape::from(self.len()),
                rhs: shape,
                op: "pinned upload",
            }
            .into());
        }
        let stream = self.device.cuda_stream();
        // SAFETY: every element is written by the copy below before the slice is read.
        let mut slice: CudaSlice<f32> = unsafe { stream.alloc::<f32>(self.len()) }.map_err(driver)?;
        stream.memcpy_htod(&self.host, &mut slice).map_err(driver)?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, self.device.clone()));
        Ok(Tensor::from_storage(storage, shape, candle::op::BackpropOp::none(), false))
    }

    /// Copies an F32 tensor on the buffer's device into the buffer (queued on the device's
    /// stream; [`Self::as_slice`] waits for it).
    ///
    /// # Errors
    /// A tensor of another dtype, device or element count, or a driver error.
    pub fn download(&mut self, tensor: &Tensor) -> Result<()> {
        let tensor = tensor.to_dtype(candle::DType::F32)?.contiguous()?;
        if tensor.elem_count() != self.len() {
            return Err(candle::Error::ShapeMismatchBinaryOp {
                lhs: Shape::from(self.len()),
                rhs: tensor.shape().clone(),
                op: "pinned download",
            }
            .into());
        }
        let (storage, layout) = tensor.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            return Err(candle::Error::DeviceMismatchBinaryOp {
                lhs: Device::Cuda(self.device.clone()).location(),
                rhs: tensor.device().location(),
                op: "pinned download",
            }
            .into());
        };
        let start = layout.start_offset();
        let source = storage.as_cuda_slice::<f32>()?.slice(start..start + self.len());
        self.device.cuda_stream().memcpy_dtoh(&source, &mut self.host).map_err(driver)?;
        Ok(())
    }
}
