//! Helpers shared by the integration tests that build model folders.
#![allow(dead_code)]

pub mod stack_model;

use std::collections::HashMap;

use candle::quantized::gguf_file::Value;
use candle_fit::gguf_tokenizer::LmTokenizer;

pub const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A byte-level BPE tokenizer of 23 tokens (18 letters a..r, `Ċ` (newline), `Ġ` (space), three control tokens: pad 20,
/// bos 21, eos 22) with a chat template, built from GGUF-style metadata: the vocabulary of
/// [`LlamaConfig::tiny`].
pub fn tiny_tokenizer() -> anyhow::Result<LmTokenizer> {
    let mut tokens: Vec<String> = ('a'..='r').map(String::from).collect();
    tokens.extend(["Ċ", "Ġ", "<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    let types: Vec<Value> = (0..tokens.len()).map(|i| Value::I32(if i >= 20 { 3 } else { 1 })).collect();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let metadata = HashMap::from([
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
        ("tokenizer.ggml.merges".to_string(), strings(Vec::new())),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.padding_token_id".to_string(), Value::U32(20)),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(21)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(22)),
        ("tokenizer.chat_template".to_string(), Value::String(TEMPLATE.into())),
    ]);
    Ok(LmTokenizer::from_gguf_metadata(&metadata)?)
}

/// `n` token examples of uneven lengths (3 to 13 tokens of a 64-token vocabulary, drawn from
/// `seed`), the first third of each masked with [`IGNORE_INDEX`] as a prompt is.
pub fn masked_examples(n: usize, seed: u64) -> Vec<candle_fit::datasets::Example> {
    use candle_fit::datasets::{Example, IGNORE_INDEX};
    (0..n)
        .map(|i| {
            let mut rng = candle_fit::ckpt::RngKey::new(seed).with_stream(i as u64).rng();
            let len = 3 + rng.below(11) as usize;
            let input_ids: Vec<u32> = (0..len).map(|_| rng.below(64) as u32).collect();
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(j, &id)| if j < len / 3 { IGNORE_INDEX } else { i64::from(id) })
                .collect();
            Example { input_ids, labels }
        })
        .collect()
}
