//! Replayable randomness: generators keyed by (seed, step, micro-batch, segment, stream).
//!
//! Recomputing a segment must draw exactly the same random numbers as its first forward
//! (the same dropout mask), so nothing in a segment may use an unseedable global generator.
//! A [`RngKey`] names one stream of random numbers; the same key always yields the same
//! sequence, on every machine and in every build.

/// Mixes a 64-bit value (SplitMix64's finaliser, Steele et al. 2014).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Identifies one reproducible stream of random numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RngKey {
    /// The run's seed.
    pub seed: u64,
    /// The optimizer step (global batch index).
    pub step: u64,
    /// The micro-batch within the step.
    pub micro_batch: u64,
    /// The segment of the model.
    pub segment: u64,
    /// A stream within the segment (e.g. one per dropout layer).
    pub stream: u64,
}

impl RngKey {
    /// A key for the given seed with every other coordinate zero.
    pub fn new(seed: u64) -> Self {
        Self { seed, step: 0, micro_batch: 0, segment: 0, stream: 0 }
    }

    /// The same key with another stream number.
    pub fn with_stream(self, stream: u64) -> Self {
        Self { stream, ..self }
    }

    /// The generator this key names.
    pub fn rng(&self) -> Rng {
        let mut state = mix(self.seed ^ 0x6a09_e667_f3bc_c908);
        for part in [self.step, self.micro_batch, self.segment, self.stream] {
            state = mix(state ^ mix(part.wrapping_add(0x9e37_79b9_7f4a_7c15)));
        }
        Rng { state, window: None }
    }
}

/// The rows `start .. start + len` of a batch of `total` rows (samples): what one
/// data-parallel rank runs of a micro-batch. Randomness drawn per element of a batch-major
/// tensor skips the other rows' draws, so a rank draws exactly its rows of the whole batch's
/// draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleWindow {
    /// The first row.
    pub start: u64,
    /// The rows run here.
    pub len: u64,
    /// The rows of the whole batch.
    pub total: u64,
}

/// A small, fast, deterministic generator (SplitMix64). Not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    window: Option<SampleWindow>,
}

impl Rng {
    /// A generator seeded directly.
    pub fn seeded(seed: u64) -> Self {
        Self { state: mix(seed), window: None }
    }

    /// The same generator, for a batch that is `window` of a larger one.
    pub fn with_window(self, window: Option<SampleWindow>) -> Self {
        Self { window, ..self }
    }

    /// The rows of the whole batch this generator's batch is, if it is part of one.
    pub fn window(&self) -> Option<SampleWindow> {
        self.window
    }

    /// Skips `n` draws of 64 bits in O(1): SplitMix64's state advances by a constant per draw.
    pub fn skip(&mut self, n: u64) {
        self.state = self.state.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.state)
    }

    /// A uniform sample in `[0, 1)` with 24 random bits.
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// A uniform sample in `[0, 1)` with 53 random bits.
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `[0, n)`; `n` must be positive. Uses Lemire's multiply-shift,
    /// whose bias (below `n / 2^64`) is irrelevant for batch sampling.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A standard normal sample (Box-Muller).
    pub fn normal_f64(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform_f64(); // (0, 1]
        let u2 = self.uniform_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipping_equals_drawing() {
        let mut drawn = Rng::seeded(3);
        let mut skipped = drawn.clone();
        (0..1000).for_each(|_| {
            drawn.next_u64();
        });
        skipped.skip(1000);
        assert_eq!(drawn.next_u64(), skipped.next_u64());
    }

    #[test]
    fn same_key_gives_same_sequence_and_keys_differ() {
        let key = RngKey { seed: 7, step: 3, micro_batch: 1, segment: 2, stream: 0 };
        let a: Vec<u64> = (0..4).scan(key.rng(), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..4).scan(key.rng(), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        let c: Vec<u64> = (0..4).scan(key.with_stream(1).rng(), |r, _| Some(r.next_u64())).collect();
        assert_ne!(a, c);
        let d = RngKey { segment: 3, ..key }.rng().next_u64();
        assert_ne!(a[0], d);
    }

    #[test]
    fn uniform_and_normal_have_sane_moments() {
        let mut rng = Rng::seeded(1);
        let n = 100_000;
        let (mut sum, mut sum_sq) = (0.0, 0.0);
        for _ in 0..n {
            let x = rng.normal_f64();
            sum += x;
            sum_sq += x * x;
        }
        let mean = sum / n as f64;
        let var = sum_sq / n as f64 - mean * mean;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
        let u: f64 = (0..n).map(|_| rng.uniform_f32() as f64).sum::<f64>() / n as f64;
        assert!((u - 0.5).abs() < 0.01, "uniform mean {u}");
        assert!((0..1000).all(|_| rng.below(10) < 10));
    }
}
