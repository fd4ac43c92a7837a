//! Text generation with a causal language model ([`CausalLm`]: [`Llama`], [`Gpt`]): greedy
//! decoding or sampling (temperature, top-k, top-p) from a seeded generator, stopping at an
//! end-of-sequence token or a token budget, with or without a key/value cache (the same tokens
//! either way, up to float ties).

use candle::{DType, Device, Tensor};
use candle_ckpt::Rng;

use crate::models::{Gpt, KvCache, Llama};

/// What [`generate`] needs of a model: the logits of a whole sequence, and of new tokens over
/// a [`KvCache`] of the positions seen.
pub trait CausalLm {
    /// The device of its parameters (where the ids go).
    fn device(&self) -> Device;
    /// The longest sequence it reads (its positions, or a shorter attention window).
    fn max_positions(&self) -> usize;
    /// The logits `[batch, t, vocab]` of ids `[batch, t]`, without dropout.
    ///
    /// # Errors
    /// A sequence longer than [`CausalLm::max_positions`], an id out of the vocabulary, a
    /// tensor error.
    fn logits(&self, ids: &Tensor) -> candle::Result<Tensor>;
    /// The logits of new ids `[batch, t]` after the positions in `cache`, which it extends
    /// (the whole prompt over an empty cache, then one token per call).
    ///
    /// # Errors
    /// As [`CausalLm::logits`]; several new tokens over a non-empty cache.
    fn logits_cached(&self, ids: &Tensor, cache: &mut KvCache) -> candle::Result<Tensor>;
}

impl CausalLm for Llama {
    fn device(&self) -> Device {
        Llama::device(self)
    }

    fn max_positions(&self) -> usize {
        self.config().max_sequence_len()
    }

    fn logits(&self, ids: &Tensor) -> candle::Result<Tensor> {
        Llama::logits(self, ids)
    }

    fn logits_cached(&self, ids: &Tensor, cache: &mut KvCache) -> candle::Result<Tensor> {
        Llama::logits_cached(self, ids, cache)
    }
}

impl CausalLm for Gpt {
    fn device(&self) -> Device {
        self.parameters().device()
    }

    fn max_positions(&self) -> usize {
        self.config().n_ctx
    }

    fn logits(&self, ids: &Tensor) -> candle::Result<Tensor> {
        Gpt::logits(self, ids)
    }

    fn logits_cached(&self, ids: &Tensor, cache: &mut KvCache) -> candle::Result<Tensor> {
        Gpt::logits_cached(self, ids, cache)
    }
}

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first one on a tie).
    Greedy,
    /// A draw from `softmax(logits / temperature)`, restricted to the `top_k` most likely
    /// tokens (all when `None`) and then to the smallest set whose probability reaches `top_p`
    /// (all when `None`), renormalised.
    Sample {
        /// Positive; below 1 sharpens, above 1 flattens.
        temperature: f64,
        /// Keep the k most likely tokens (at least 1).
        top_k: Option<usize>,
        /// Keep the most likely tokens up to this cumulative probability, in (0, 1].
        top_p: Option<f64>,
    },
}

/// What [`generate`] does.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// The most tokens to add after the prompt.
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub sampling: Sampling,
    /// The seed of the sampling generator (unused by greedy decoding).
    pub seed: u64,
    /// Tokens that end generation (the end-of-sequence id(s)); the stop token is returned but
    /// not generated past.
    pub stop_tokens: Vec<u32>,
    /// Decode with a key/value cache (one token per forward pass) instead of re-running the
    /// whole sequence for each token.
    pub use_cache: bool,
}

impl Default for GenerationConfig {
    /// 128 new tokens, greedy, seed 0, no stop token, with the cache.
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: Sampling::Greedy,
            seed: 0,
            stop_tokens: Vec::new(),
            use_cache: true,
        }
    }
}

impl GenerationConfig {
    /// Checks the sampling settings.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] naming `temperature`, `top_k` or `top_p`.
    pub fn validate(&self) -> crate::Result<()> {
        if let Sampling::Sample { temperature, top_k, top_p } = self.sampling {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(crate::Error::config("temperature", format!("{temperature} is not positive")));
            }
            if top_k == Some(0) {
                return Err(crate::Error::config("top_k", "must be at least 1"));
            }
            if let Some(p) = top_p {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(crate::Error::config("top_p", format!("{p} is not in (0, 1]")));
                }
            }
        }
        Ok(())
    }
}

/// Picks tokens from logits by a [`Sampling`] rule with its own seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: Rng,
}

impl Sampler {
    /// A sampler drawing from `seed`.
    pub fn new(sampling: Sampling, seed: u64) -> Self {
        Self { sampling, rng: Rng::seeded(seed) }
    }

    /// The next token from `logits` (one row of the vocabulary's scores).
    ///
    /// # Errors
    /// Empty or non-finite logits.
    pub fn pick(&mut self, logits: &[f32]) -> crate::Result<u32> {
        if logits.is_empty() || logits.iter().any(|l| l.is_nan()) {
            return Err(crate::Error::config("logits", "empty or NaN logits"));
        }
        let argmax = || {
            logits.iter().enumerate().fold(0, |best, (i, &l)| if l > logits[best] { i } else { best }) as u32
        };
        let Sampling::Sample { temperature, top_k, top_p } = self.sampling else {
            return Ok(argmax());
        };
        // Most likely first; ties keep the lower id first.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        order.truncate(top_k.unwrap_or(order.len()).max(1));
        let top = f64::from(logits[order[0]]);
        let mut weights: Vec<f64> =
            order.iter().map(|&i| ((f64::from(logits[i]) - top) / temperature).exp()).collect();
        let total: f64 = weights.iter().sum();
        if let Some(p) = top_p {
            let mut cumulative = 0.0;
            let keep = weights
                .iter()
                .position(|w| {
                    cumulative += w / total;
                    cumulative >= p
                })
                .map_or(weights.len(), |i| i + 1);
            weights.truncate(keep);
        }
        let total: f64 = weights.iter().sum();
        let mut target = self.rng.uniform_f64() * total;
        for (rank, w) in weights.iter().enumerate() {
            if target < *w {
                return Ok(order[rank] as u32);
            }
            target -= w;
        }
        Ok(order[weights.len() - 1] as u32)
    }
}

/// Continues `prompt` (token ids, at least one) with `model`, calling `on_token` with each new
/// token as it is chosen (to stream it), and returns the new tokens (the stop token
/// included when one ended generation). Stops at a stop token, after `max_new_tokens`, or
/// when the sequence fills the model's positions.
///
/// # Errors
/// [`crate::Error::InvalidConfig`] for bad sampling settings or an empty prompt; a model error
/// (a token outside the vocabulary, a prompt longer than the model's positions); `on_token`'s
/// error.
pub fn generate<M: CausalLm + ?Sized>(
    model: &M,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32) -> crate::Result<()>,
) -> crate::Result<Vec<u32>> {
    config.validate()?;
    if prompt.is_empty() {
        return Err(crate::Error::config("prompt", "has no tokens"));
    }
    let device = model.device();
    // The positions, or the attention window when shorter (longer sequences are refused).
    let max_positions = model.max_positions();
    let mut sampler = Sampler::new(config.sampling, config.seed);
    let mut cache = KvCache::new();
    let mut sequence = prompt.to_vec();
    let mut new_tokens = Vec::new();
    let mut pending: Vec<u32> = prompt.to_vec();
    while new_tokens.len() < config.max_new_tokens && sequence.len() < max_positions {
        let logits = if config.use_cache {
            let ids = Tensor::new(pending.as_slice(), &device)?.unsqueeze(0)?;
            model.logits_cached(&ids, &mut cache)?
        } else {
            model.logits(&Tensor::new(sequence.as_slice(), &device)?.unsqueeze(0)?)?
        };
        let (_, t, _) = logits.dims3()?;
        let last = logits.narrow(1, t - 1, 1)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let token = sampler.pick(&last)?;
        sequence.push(token);
        new_tokens.push(token);
        on_token(token)?;
        if config.stop_tokens.contains(&token) {
            break;
        }
        pending = vec![token];
    }
    Ok(new_tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() -> crate::Result<()> {
        let mut sampler = Sampler::new(Sampling::Greedy, 0);
        assert_eq!(sampler.pick(&[0.1, 2.0, -1.0, 2.0])?, 1);
        Ok(())
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() -> crate::Result<()> {
        let logits = [0.5f32, 1.5, 1.0, -3.0];
        for sampling in [
            Sampling::Sample { temperature: 5.0, top_k: Some(1), top_p: None },
            Sampling::Sample { temperature: 5.0, top_k: None, top_p: Some(1e-6) },
        ] {
            let mut sampler = Sampler::new(sampling, 3);
            for _ in 0..50 {
                assert_eq!(sampler.pick(&logits)?, 1);
            }
        }
        Ok(())
    }

    #[test]
    fn sampling_follows_the_softmax_and_the_seed() -> crate::Result<()> {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]; top-k 2 keeps both.
        let logits = [0f32, 3f32.ln()];
        let sampling = Sampling::Sample { temperature: 1.0, top_k: Some(2), top_p: None };
        let mut sampler = Sampler::new(sampling, 11);
        let draws: Vec<u32> = (0..4000).map(|_| sampler.pick(&logits)).collect::<crate::Result<_>>()?;
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / draws.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        let mut again = Sampler::new(sampling, 11);
        let repeat: Vec<u32> = (0..4000).map(|_| again.pick(&logits)).collect::<crate::Result<_>>()?;
        assert_eq!(draws, repeat, "the same seed draws the same tokens");
        Ok(())
    }

    #[test]
    fn top_p_drops_the_unlikely_tail() -> crate::Result<()> {
        // p = [0.7, 0.2, 0.1]: top-p 0.8 keeps the first two, never the third.
        let logits = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let mut sampler =
            Sampler::new(Sampling::Sample { temperature: 1.0, top_k: None, top_p: Some(0.8) }, 5);
        let draws: Vec<u32> = (0..2000).map(|_| sampler.pick(&logits)).collect::<crate::Result<_>>()?;
        assert!(!draws.contains(&2));
        assert!(draws.contains(&1));
        Ok(())
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let bad = |sampling| GenerationConfig { sampling, ..GenerationConfig::default() }.validate();
        let message = |r: crate::Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message(bad(Sampling::Sample { temperature: 0.0, top_k: None, top_p: None }))
            .contains("temperature"));
        assert!(message(bad(Sampling::Sample { temperature: 1.0, top_k: Some(0), top_p: None }))
            .contains("top_k"));
        assert!(message(bad(Sampling::Sample { temperature: 1.0, top_k: None, top_p: Some(1.5) }))
            .contains("top_p"));
    }
}
