//! The reference for `candle-fit generate --timings` on a GGUF file (BENCHMARKS.md):
//! candle-transformers' `quantized_llama` on the same file, with the same tokenizer (rebuilt from
//! the file's metadata) and the same prompt, greedy, its matmuls on the quantized weights. Prints
//! the prompt's processing and the decoding speed in the format of `--timings`.
//!
//! ```text
//! cargo run --release --example quantized_llama_speed -- FILE.gguf "PROMPT" [NEW_TOKENS]
//! ```

use anyhow::Context;
use candle::quantized::gguf_file;
use candle::{Device, Tensor};
use candle_fit::gguf_tokenizer::LmTokenizer;
use candle_transformers::models::quantized_llama::ModelWeights;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().context("usage: quantized_llama_speed FILE.gguf PROMPT [NEW_TOKENS]")?;
    let text = args.next().context("usage: quantized_llama_speed FILE.gguf PROMPT [NEW_TOKENS]")?;
    let new_tokens: usize = args.next().map_or(Ok(64), |n| n.parse()).context("NEW_TOKENS")?;
    let device = Device::Cpu;
    let mut file = std::fs::File::open(&path).with_context(|| path.clone())?;
    let content = gguf_file::Content::read(&mut file).with_context(|| path.clone())?;
    let tokenizer = LmTokenizer::from_gguf_metadata(&content.metadata)?;
    let mut model = ModelWeights::from_gguf(content, &mut file, &device)?;
    let prompt = tokenizer.encode(&text)?;

    let start = std::time::Instant::now();
    let logits = model.forward(&Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?, 0)?;
    let mut next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
    let first = std::time::Instant::now();
    let mut generated = vec![next];
    let eos = tokenizer.eos_id();
    while generated.len() < new_tokens && Some(next) != eos {
        let position = prompt.len() + generated.len() - 1;
        let logits = model.forward(&Tensor::new(&[[next]], &device)?, position)?;
        next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        generated.push(next);
    }
    let end = std::time::Instant::now();
    let kept: Vec<u32> = generated.iter().copied().filter(|t| Some(*t) != eos).collect();
    println!("{}", tokenizer.decode(&kept)?);
    let (prompt_s, decode_s) = ((first - start).as_secs_f64(), (end - first).as_secs_f64());
    let decoded = generated.len() - 1;
    eprintln!(
        "prompt: {} tokens in {prompt_s:.3} s ({:.1} tokens/s); decode: {decoded} tokens in {decode_s:.3} s ({:.1} tokens/s)",
        prompt.len(),
        prompt.len() as f64 / prompt_s,
        decoded as f64 / decode_s.max(f64::MIN_POSITIVE),
    );
    Ok(())
}
