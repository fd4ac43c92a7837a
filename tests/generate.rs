//! Generation with the tiny LLaMA in F32: the key/value cache gives the same logits (1e-5
//! relative) and the same tokens as re-running the whole sequence, greedy and sampled; stop
//! tokens end generation.

use candle::{DType, Device, IndexOp, Tensor};
use candle_fit::train::generate::{generate, GenerationConfig, Sampling};
use candle_fit::train::models::{KvCache, Llama, LlamaConfig};

fn model(seed: u64) -> anyhow::Result<Llama> {
    // A larger init than 0.02 so the logits are far from uniform and greedy decoding has no
    // near-ties.
    let config = LlamaConfig::tiny();
    let plain = Llama::new(&config, DType::F32, &Device::Cpu, seed)?;
    let scaled = plain
        .parameters()
        .iter()
        .map(|p| {
            let t = p.tensor()?;
            let t = if p.name.contains("norm") { t } else { (t * 20.0)? };
            Ok((p.name.clone(), t))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Llama::from_tensors(&config, scaled, DType::F32, &Device::Cpu)?)
}

#[test]
fn cached_logits_equal_the_full_sequence_logits() -> anyhow::Result<()> {
    let model = model(1)?;
    let ids: Vec<u32> = vec![3, 7, 1, 19, 4, 4, 12, 0];
    let full = model.logits(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?.i(0)?;
    let mut cache = KvCache::new();
    let prefix =
        model.logits_cached(&Tensor::new(&ids[..3], &Device::Cpu)?.unsqueeze(0)?, &mut cache)?.i(0)?;
    let mut rows = vec![prefix];
    for &id in &ids[3..] {
        rows.push(model.logits_cached(&Tensor::new(&[[id]], &Device::Cpu)?, &mut cache)?.i(0)?);
    }
    assert_eq!(cache.len(), ids.len());
    let cached = Tensor::cat(&rows, 0)?;
    let scale = full.abs()?.max_all()?.to_scalar::<f32>()?;
    let error = (full - cached)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
    assert!(error < 1e-5, "max relative difference {error}");
    // Several new tokens over a non-empty cache are refused.
    assert!(model.logits_cached(&Tensor::new(&[[1u32, 2]], &Device::Cpu)?, &mut cache).is_err());
    Ok(())
}

#[test]
fn generation_with_the_cache_equals_generation_without_it() -> anyhow::Result<()> {
    let samplings = [
        Sampling::Greedy,
        Sampling::Sample { temperature: 0.8, top_k: Some(10), top_p: Some(0.9) },
        Sampling::Sample { temperature: 1.5, top_k: None, top_p: None },
    ];
    for (seed, sampling) in samplings.into_iter().enumerate() {
        let model = model(seed as u64 + 2)?;
        let config =
            GenerationConfig { max_new_tokens: 20, sampling, seed: 7, ..GenerationConfig::default() };
        let mut streamed = Vec::new();
        let cached = generate(&model, &[5, 1, 9], &config, |t| {
            streamed.push(t);
            Ok(())
        })?;
        let plain =
            generate(&model, &[5, 1, 9], &GenerationConfig { use_cache: false, ..config.clone() }, |_| {
                Ok(())
            })?;
        assert_eq!(cached.len(), 20);
        assert_eq!(cached, plain, "{sampling:?}");
        assert_eq!(streamed, cached, "every token is streamed, in order");
        if sampling != Sampling::Greedy {
            let other =
                generate(&model, &[5, 1, 9], &GenerationConfig { seed: 8, ..config.clone() }, |_| Ok(()))?;
            assert_ne!(other, cached, "another seed draws other tokens");
        }
    }
    Ok(())
}

#[test]
fn a_stop_token_ends_generation_and_positions_bound_it() -> anyhow::Result<()> {
    let model = model(4)?;
    let config = GenerationConfig { max_new_tokens: 12, ..GenerationConfig::default() };
    let free = generate(&model, &[2, 3], &config, |_| Ok(()))?;
    let stop = free[4];
    let first = free.iter().position(|&t| t == stop).expect("the token occurs");
    let stopped =
        generate(&model, &[2, 3], &GenerationConfig { stop_tokens: vec![stop], ..config }, |_| Ok(()))?;
    assert_eq!(stopped, free[..=first].to_vec());
    // 32 positions: a 30-token prompt leaves room for 2.
    let long = generate(
        &model,
        &[1; 30],
        &GenerationConfig { max_new_tokens: 10, ..GenerationConfig::default() },
        |_| Ok(()),
    )?;
    assert_eq!(long.len(), 2);
    Ok(())
}
