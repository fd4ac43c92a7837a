//! `candle-fit bench-optimizer`: the CPU optimizer step's throughput against the machine's
//! memory bandwidth, measured in the same run.
//!
//! AdamW over FP32 reads the parameter, the gradient and both moments and writes the
//! parameter and both moments back: 28 bytes per parameter. The bound is the copy bandwidth:
//! a copy of `n` bytes is counted as `2n` bytes moved (read and write, the STREAM "Copy"
//! convention). A copy's destination is also read into the cache before it is written (the
//! write-allocate), which the convention does not count; AdamW writes where it just read, so
//! its 28 bytes are all it moves. Both are timed with one thread and with rayon's pool.

use std::time::Instant;

use anyhow::bail;
use candle_train::optim::{AdamW, AdamW8bit, AdamWConfig, Optimizer, PARALLEL_CHUNK};
use rayon::prelude::*;
use serde::Serialize;

/// Bytes AdamW moves per FP32 parameter: reads p, g, m, v; writes p, m, v.
pub const ADAMW_BYTES_PER_PARAM: usize = 28;

/// What to measure.
#[derive(Debug, Clone)]
pub struct OptimBenchOptions {
    /// Parameter counts to step (one flat parameter each).
    pub sizes: Vec<usize>,
    /// Timed repetitions per measurement (after one untimed).
    pub repeats: usize,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct OptimBenchRow {
    /// `copy`, `adamw` or `adamw8bit`.
    pub kernel: String,
    /// `1 thread` or `N threads`.
    pub threads: usize,
    /// Parameters (or, for `copy`, FP32 values copied).
    pub elements: usize,
    /// Median seconds per pass.
    pub median_s: f64,
    /// Elements per second at the median.
    pub elements_per_s: f64,
    /// Bytes moved per second at the median (copy: 8 per value; AdamW: 28 per parameter;
    /// 8-bit AdamW: not counted).
    pub bytes_per_s: Option<f64>,
    /// `bytes_per_s` over the copy bandwidth with the same threads and size.
    pub fraction_of_copy: Option<f64>,
}

fn median_time(repeats: usize, mut pass: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    pass()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        pass()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(candle_train::trainer::median(&times))
}

/// Runs `work` on one thread, or on rayon's global pool.
fn with_threads<R: Send>(threads: usize, work: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
    if threads == 1 {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
        Ok(pool.install(work))
    } else {
        Ok(work())
    }
}

fn copy_row(n: usize, threads: usize, repeats: usize) -> anyhow::Result<OptimBenchRow> {
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let c = PARALLEL_CHUNK;
    let median_s = with_threads(threads, || {
        median_time(repeats, || {
            dst.par_chunks_mut(c).zip(src.par_chunks(c)).for_each(|(d, s)| d.copy_from_slice(s));
            Ok(())
        })
    })??;
    if dst[n - 1] != src[n - 1] {
        bail!("the copy did not copy");
    }
    let bytes = (8 * n) as f64 / median_s;
    Ok(OptimBenchRow {
        kernel: "copy".into(),
        threads,
        elements: n,
        median_s,
        elements_per_s: n as f64 / median_s,
        bytes_per_s: Some(bytes),
        fraction_of_copy: None,
    })
}

fn optimizer_row(
    kind: &str,
    mut optimizer: Box<dyn Optimizer>,
    n: usize,
    threads: usize,
    repeats: usize,
) -> anyhow::Result<OptimBenchRow> {
    let mut param: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 1e-3).collect();
    let grad: Vec<f32> = (0..n).map(|i| ((i % 777) as f32 - 388.0) * 1e-4).collect();
    let median_s = with_threads(threads, || {
        median_time(repeats, || {
            optimizer.begin_step();
            optimizer.update_parallel(0, &mut param, &grad, 1e-3, true)?;
            Ok(())
        })
    })??;
    if !param.iter().all(|p| p.is_finite()) {
        bail!("{kind} produced a non-finite parameter");
    }
    let bytes_per_s = (kind == "adamw").then(|| (ADAMW_BYTES_PER_PARAM * n) as f64 / median_s);
    Ok(OptimBenchRow {
        kernel: kind.into(),
        threads,
        elements: n,
        median_s,
        elements_per_s: n as f64 / median_s,
        bytes_per_s,
        fraction_of_copy: None,
    })
}

/// Measures the copy bandwidth and the AdamW and 8-bit AdamW steps for every size, with one
/// thread and with rayon's pool; fills `fraction_of_copy` for AdamW.
///
/// # Errors
/// An empty or zero size, zero repeats, or an optimizer error.
pub fn run(options: &OptimBenchOptions) -> anyhow::Result<Vec<OptimBenchRow>> {
    if options.sizes.is_empty() || options.sizes.contains(&0) {
        bail!("invalid `--params`: give one or more positive parameter counts");
    }
    if options.repeats == 0 {
        bail!("invalid `--repeats`: must be at least 1");
    }
    let pool = rayon::current_num_threads();
    let mut thread_counts = vec![1];
    if pool > 1 {
        thread_counts.push(pool);
    }
    let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    let mut rows = Vec::new();
    for &n in &options.sizes {
        for &threads in &thread_counts {
            let copy = copy_row(n, threads, options.repeats)?;
            let mut adamw = optimizer_row("adamw", Box::new(AdamW::new(config, &[n])?), n, threads, options.repeats)?;
            adamw.fraction_of_copy = adamw.bytes_per_s.zip(copy.bytes_per_s).map(|(a, c)| a / c);
            let q = optimizer_row("adamw8bit", Box::new(AdamW8bit::new(config, &[n])?), n, threads, options.repeats)?;
            rows.extend([copy, adamw, q]);
        }
    }
    Ok(rows)
}

/// The rows as a Markdown table.
pub fn markdown_table(rows: &[OptimBenchRow]) -> String {
    let mut out = String::from(
        "| kernel | threads | elements | median ms | elements/s | GB/s moved | of copy bandwidth |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.3e} | {} | {} |\n",
            r.kernel,
            r.threads,
            r.elements,
            r.median_s * 1e3,
            r.elements_per_s,
            r.bytes_per_s.map_or("-".into(), |b| format!("{:.2}", b / 1e9)),
            r.fraction_of_copy.map_or("-".into(), |f| format!("{:.0}%", f * 100.0)),
        ));
    }
    out
}
