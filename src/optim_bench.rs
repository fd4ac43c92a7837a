//! `candle-fit bench-optimizer`: the CPU optimizer step's throughput against the machine's
//! memory bandwidth, measured in the same run.
//!
//! AdamW over FP32 reads the parameter, the gradient and both moments and writes the
//! parameter and both moments back: 28 bytes per parameter. The bound is the memory
//! bandwidth, measured in the same run by three streaming kernels over FP32 arrays as large in
//! all as AdamW's four (16 bytes per parameter, so the caches help neither side): `copy` (`copy_from_slice`, i.e. memcpy; counted as 8 bytes per value, the STREAM
//! "Copy" convention, which leaves out the write-allocate read of the destination), `scale`
//! (`x *= c` in place: 8 bytes per value, the access pattern of AdamW, which writes where it
//! just read) and `read` (a sum: 4 bytes per value). AdamW's bytes per second are reported as
//! a fraction of `copy`'s (what the issue asks) and of the best of the three (the stricter
//! bound). Everything is timed with one thread and with rayon's pool.

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
    /// `copy`, `scale`, `read`, `adamw` or `adamw8bit`.
    pub kernel: String,
    /// Threads: 1, or all of rayon's pool.
    pub threads: usize,
    /// Parameters, or FP32 values for the streaming kernels.
    pub elements: usize,
    /// Median seconds per pass.
    pub median_s: f64,
    /// Elements per second at the median.
    pub elements_per_s: f64,
    /// Bytes moved per second at the median (copy and scale: 8 per value; read: 4; AdamW: 28
    /// per parameter; 8-bit AdamW: not counted).
    pub bytes_per_s: Option<f64>,
    /// `bytes_per_s` over the `copy` kernel's with the same threads and size.
    pub fraction_of_copy: Option<f64>,
    /// `bytes_per_s` over the best streaming kernel's with the same threads and size.
    pub fraction_of_best: Option<f64>,
}

fn median_time(repeats: usize, mut pass: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    pass()?;
    let mut times = Vec::with_capacity(repeats.min(1 << 10));
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

/// A streaming kernel: its name, the bytes it moves per value, whether it uses the `src`
/// and the `dst` array, and one pass over them.
type Stream = (&'static str, usize, bool, bool, fn(&[f32], &mut [f32]) -> f32);

const STREAMS: [Stream; 3] = [
    ("copy", 8, true, true, |s, d| {
        d.par_chunks_mut(PARALLEL_CHUNK)
            .zip(s.par_chunks(PARALLEL_CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
        d.last().copied().unwrap_or(0.0)
    }),
    ("scale", 8, false, true, |_, d| {
        d.par_chunks_mut(PARALLEL_CHUNK).for_each(|d| d.iter_mut().for_each(|x| *x *= 0.999_999));
        d.first().copied().unwrap_or(0.0)
    }),
    ("read", 4, true, false, |s, _| s.par_chunks(PARALLEL_CHUNK).map(sum).sum()),
];

/// A sum over 16 independent lanes, so the compiler vectorizes it (a plain float sum is one
/// dependent chain of additions, bound by their latency rather than by memory).
fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, v)| *l += v);
    }
    lanes.iter().sum::<f32>() + rest
}

/// Runs a streaming kernel over the footprint of AdamW on `params` parameters (four FP32
/// arrays, 16 bytes per parameter), so the caches help neither side.
fn stream_row(
    stream: &Stream,
    params: usize,
    threads: usize,
    repeats: usize,
) -> anyhow::Result<OptimBenchRow> {
    let (name, bytes_per_value, uses_src, uses_dst, pass) = *stream;
    let n = 4 * params / (usize::from(uses_src) + usize::from(uses_dst));
    let src: Vec<f32> = (0..if uses_src { n } else { 0 }).map(|i| (i % 1024) as f32).collect();
    let mut dst = vec![1f32; if uses_dst { n } else { 0 }];
    let mut sink = 0f32;
    let median_s = with_threads(threads, || {
        median_time(repeats, || {
            sink += pass(&src, &mut dst);
            Ok(())
        })
    })??;
    if !sink.is_finite() {
        bail!("the {name} kernel produced a non-finite value");
    }
    Ok(OptimBenchRow {
        kernel: name.into(),
        threads,
        elements: n,
        median_s,
        elements_per_s: n as f64 / median_s,
        bytes_per_s: Some((bytes_per_value * n) as f64 / median_s),
        fraction_of_copy: None,
        fraction_of_best: None,
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
        fraction_of_best: None,
    })
}

/// Measures the streaming kernels (over AdamW's footprint) and the AdamW and 8-bit AdamW steps
/// for every size, with one thread and with rayon's pool; fills AdamW's fractions.
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
    // AdamW's step holds parameter, gradient and two moments (16 bytes per parameter), the
    // copy streams two buffers: refuse before allocating what the machine does not have.
    if let Some(&n) = options.sizes.iter().max() {
        let needed = (n as u128).saturating_mul(16);
        let available = crate::bench::available_memory().map_or(1u128 << 48, |a| a as u128);
        if needed > available {
            bail!(
                "invalid `--params`: {n} parameters need at least {needed} bytes for AdamW's step, but only {available} are available"
            );
        }
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
            let streams = STREAMS
                .iter()
                .map(|k| stream_row(k, n, threads, options.repeats))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let copy = streams[0].bytes_per_s;
            let best = streams.iter().filter_map(|r| r.bytes_per_s).fold(0.0, f64::max);
            let mut adamw =
                optimizer_row("adamw", Box::new(AdamW::new(config, &[n])?), n, threads, options.repeats)?;
            adamw.fraction_of_copy = adamw.bytes_per_s.zip(copy).map(|(a, c)| a / c);
            adamw.fraction_of_best = adamw.bytes_per_s.map(|a| a / best);
            let q = optimizer_row(
                "adamw8bit",
                Box::new(AdamW8bit::new(config, &[n])?),
                n,
                threads,
                options.repeats,
            )?;
            rows.extend(streams);
            rows.extend([adamw, q]);
        }
    }
    Ok(rows)
}

fn percent(fraction: Option<f64>) -> String {
    fraction.map_or("-".into(), |f| format!("{:.0}%", f * 100.0))
}

/// The rows as a Markdown table.
pub fn markdown_table(rows: &[OptimBenchRow]) -> String {
    let mut out = String::from(
        "| kernel | threads | elements | median ms | elements/s | GB/s moved | of copy | of best stream |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.3e} | {} | {} | {} |\n",
            r.kernel,
            r.threads,
            r.elements,
            r.median_s * 1e3,
            r.elements_per_s,
            r.bytes_per_s.map_or("-".into(), |b| format!("{:.2}", b / 1e9)),
            percent(r.fraction_of_copy),
            percent(r.fraction_of_best),
        ));
    }
    out
}
