//! Process-wide settings for fast CPU training: the allocator keeps freed memory instead of
//! handing it back to the kernel, the caller's work runs on one of rayon's worker threads, and
//! Candle's element-wise maps run on the caller's thread.
//!
//! Every Candle op allocates a fresh buffer. With glibc's default settings the large ones
//! (activations, gradients) are `mmap`ed and `munmap`ed again, or carved from a heap top that
//! is trimmed as soon as they are freed, so a step page-faults and zeroes its activations anew
//! each time (about a quarter of a CPU step's time on the default GPT). [`retain_freed_memory`]
//! makes glibc serve them from its heap and keep freed memory for the next step: live bytes, and
//! so [`CountingAllocator`](crate::memory::CountingAllocator)'s figures, do not change (it counts
//! what is requested, whatever serves it); the process's resident size stays at its high-water
//! mark instead of falling between steps.
//!
//! The matmul (the `gemm` crate, through Candle) splits large products over rayon's global
//! pool. Called from an outside thread, the caller sleeps while the pool works and the pool's
//! threads then spin idle while the caller runs the next element-wise ops: three threads on two
//! cores. [`run_on_pool`] runs the caller's work on a pool worker, so that thread takes part in
//! the matmul and only the others wait. [`serial_candle_maps`] keeps Candle's own spinning
//! thread pool for element-wise maps out of the way.

use std::sync::atomic::{AtomicBool, Ordering};

/// glibc's largest `M_MMAP_THRESHOLD` on 64-bit targets (`DEFAULT_MMAP_THRESHOLD_MAX`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_MAX: i32 = 32 << 20;

static RETAINING: AtomicBool = AtomicBool::new(false);

/// Makes the system allocator keep freed memory for reuse: on glibc, blocks up to 32 MiB come
/// from the heap instead of `mmap`, and the heap is never trimmed. Returns whether the setting
/// took effect (false on other C libraries and platforms, where nothing changes). Call it early,
/// before other threads allocate.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes glibc's allocation parameters; it is documented as safe
        // to call at any time, and these values are in their valid ranges.
        let applied = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        };
        RETAINING.store(applied, Ordering::Relaxed);
        applied
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Whether [`retain_freed_memory`] took effect in this process.
pub fn retains_freed_memory() -> bool {
    RETAINING.load(Ordering::Relaxed)
}

/// Makes Candle run its element-wise maps on the calling thread (`CANDLE_NUM_THREADS=1`) unless
/// the environment already sets `CANDLE_NUM_THREADS`; returns whether it set it. Must run before
/// Candle's first CPU op and before any other thread starts (it writes the environment): first
/// thing in `main`.
///
/// Candle 0.11 splits binary maps over a "barrier pool" of `CANDLE_NUM_THREADS - 1` threads
/// (by default one per physical core beside the caller) whose workers spin 25,000 times before
/// parking and whose caller spins, without bound, until they are done. On two cores, beside
/// rayon's pool (the matmul's threads, and this crate's fused kernels), that is four threads on
/// two cores: measured on the default GPT on the 2-core CI machine under load, the caller's spin
/// alone took 40% of the step. The matmul's thread count (`RAYON_NUM_THREADS`) is not affected.
pub fn serial_candle_maps() -> bool {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return false;
    }
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    true
}

/// The number of threads Candle's CPU matmul asks for (`RAYON_NUM_THREADS`, else the physical
/// cores Candle sees).
pub fn matmul_threads() -> usize {
    candle::utils::get_num_threads()
}

/// Runs `work` on a worker of a rayon pool of `threads` threads (at least 1) and returns its
/// result. Inside, rayon's parallel work (the matmul's included) uses that pool, with the
/// calling worker taking part.
///
/// # Errors
/// When the pool's threads cannot be started.
pub fn run_on_pool<R: Send>(
    threads: usize,
    work: impl FnOnce() -> R + Send,
) -> Result<R, rayon::ThreadPoolBuildError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("candle-fit-worker-{i}"))
        .build()?;
    Ok(pool.install(work))
}
