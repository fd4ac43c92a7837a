//! Exact memory accounting: a counting global allocator on CPU, the memory pool's counters
//! on CUDA ([`DeviceMeter`] picks by device), and a memory report by category.
//!
//! Binaries and tests install the allocator:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: candle_train::memory::CountingAllocator = candle_train::memory::CountingAllocator;
//! ```

use std::alloc::{GlobalAlloc, Layout};

#[cfg(feature = "mimalloc")]
use mimalloc::MiMalloc as System;
#[cfg(not(feature = "mimalloc"))]
use std::alloc::System;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting current and peak live heap bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingAllocator;

fn added(size: usize) {
    let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's layout unchanged and only
// updates counters beside it, so `System`'s guarantees carry over.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's (non-zero-size) layout.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            added(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            added(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (hence `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract, which `System` shares.
        let new_ptr = unsafe { System.realloc(ptr, layout, new_size) };
        if !new_ptr.is_null() {
            if new_size >= layout.size() {
                added(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        new_ptr
    }
}

/// Whether the counting allocator is this process's global allocator (it has served at
/// least one allocation).
pub fn is_installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Live heap bytes now (0 if the allocator is not installed).
pub fn current_bytes() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// The most live heap bytes since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new peak measurement from the current level; returns that level.
pub fn reset_peak() -> usize {
    let now = CURRENT.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// The counters of one device's memory: the counting allocator's heap bytes on CPU, the
/// stream-ordered memory pool's bytes in use on CUDA (`crate::cuda`, feature `cuda`), which is
/// what `torch.cuda.max_memory_allocated` reports.
#[derive(Debug, Clone)]
pub enum DeviceMeter {
    /// The process heap, through [`CountingAllocator`] (CPU and any device without a meter).
    Heap,
    /// The CUDA device's memory pool.
    #[cfg(feature = "cuda")]
    CudaPool(candle::CudaDevice),
}

impl DeviceMeter {
    /// The meter for memory on `device`: the pool on a CUDA device (in a build with the `cuda`
    /// feature), the heap everywhere else.
    pub fn for_device(device: &candle::Device) -> Self {
        #[cfg(feature = "cuda")]
        if let candle::Device::Cuda(cuda) = device {
            return Self::CudaPool(cuda.clone());
        }
        let _ = device; // Only CUDA devices have their own meter.
        Self::Heap
    }

    /// What it counts, for reports: `heap` or `cuda-pool`.
    pub fn source(&self) -> &'static str {
        match self {
            Self::Heap => "heap",
            #[cfg(feature = "cuda")]
            Self::CudaPool(_) => "cuda-pool",
        }
    }

    /// Whether it measures anything: the heap meter needs the counting allocator installed;
    /// the pool always counts.
    pub fn is_available(&self) -> bool {
        match self {
            Self::Heap => is_installed(),
            #[cfg(feature = "cuda")]
            Self::CudaPool(_) => true,
        }
    }

    /// Bytes live now (0 when the counters cannot be read; the reason goes to the log).
    pub fn current_bytes(&self) -> usize {
        match self {
            Self::Heap => current_bytes(),
            #[cfg(feature = "cuda")]
            Self::CudaPool(device) => cuda_or_zero(crate::cuda::pool_stats(device).map(|s| s.used_current)),
        }
    }

    /// The most bytes live at once since the last [`Self::reset_peak`].
    pub fn peak_bytes(&self) -> usize {
        match self {
            Self::Heap => peak_bytes(),
            #[cfg(feature = "cuda")]
            Self::CudaPool(device) => cuda_or_zero(crate::cuda::pool_stats(device).map(|s| s.used_high)),
        }
    }

    /// Starts a new peak measurement from the current level; returns that level.
    pub fn reset_peak(&self) -> usize {
        match self {
            Self::Heap => reset_peak(),
            #[cfg(feature = "cuda")]
            Self::CudaPool(device) => cuda_or_zero(crate::cuda::reset_peak(device)),
        }
    }
}

impl candle_ckpt::MemoryMeter for DeviceMeter {
    fn current_bytes(&self) -> usize {
        DeviceMeter::current_bytes(self)
    }

    fn peak_bytes(&self) -> usize {
        DeviceMeter::peak_bytes(self)
    }

    fn reset_peak(&self) -> usize {
        DeviceMeter::reset_peak(self)
    }
}

#[cfg(feature = "cuda")]
fn cuda_or_zero(bytes: crate::Result<usize>) -> usize {
    bytes.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the CUDA memory pool's counters");
        0
    })
}

/// Where a training step's memory goes, in bytes.
///
/// `activations` is the rest of the step's peak: everything allocated during the step above
/// the level at its start (activations, their gradients, temporaries). `other` is what was
/// live at the step's start besides the model state (data, code tables).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Model parameters in their compute dtype.
    pub parameters: usize,
    /// Gradient accumulators (FP32).
    pub gradients: usize,
    /// FP32 master weights (zero when parameters are FP32).
    pub master_weights: usize,
    /// Optimizer state (moments, momentum).
    pub optimizer_state: usize,
    /// Peak bytes allocated during the step above its starting level.
    pub activations: usize,
    /// Live bytes at the step's start not in the categories above.
    pub other: usize,
    /// The step's peak live bytes.
    pub peak: usize,
    /// Bytes the step moved between the host and the device, by cause (zero on the CPU
    /// device; set by the Trainer, zero in estimates).
    #[serde(default)]
    pub transfers: crate::updater::Transfers,
}

impl MemoryReport {
    /// A report from the model-state sizes, the live bytes at the step's start and its peak.
    pub fn new(
        parameters: usize,
        gradients: usize,
        master_weights: usize,
        optimizer_state: usize,
        start: usize,
        peak: usize,
    ) -> Self {
        let state = parameters + gradients + master_weights + optimizer_state;
        Self {
            parameters,
            gradients,
            master_weights,
            optimizer_state,
            activations: peak.saturating_sub(start),
            other: start.saturating_sub(state),
            peak,
            transfers: Default::default(),
        }
    }

    /// The categories as (name, bytes) pairs, in a fixed order.
    pub fn categories(&self) -> [(&'static str, usize); 6] {
        [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("master_weights", self.master_weights),
            ("optimizer_state", self.optimizer_state),
            ("activations", self.activations),
            ("other", self.other),
        ]
    }
}

/// Formats bytes as MiB with one decimal.
pub fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_meter_is_the_counting_allocator() {
        let meter = DeviceMeter::for_device(&candle::Device::Cpu);
        assert_eq!(meter.source(), "heap");
        // The crate's tests install the counting allocator.
        assert!(meter.is_available());
        // Other tests allocate, free and reset the peak concurrently: only what the live block
        // guarantees is exact (tests/device_matrix.rs checks the peak serially).
        let block = vec![1u8; 1 << 20];
        assert!(meter.current_bytes() >= block.len());
        assert!(meter.peak_bytes() >= block.len());
        drop(block);
    }
}
