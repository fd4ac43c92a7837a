//! The fuzzed loader: an input is a checkpoint directory flattened into one byte string
//! (manifest, model, master and optimizer files, each behind a little-endian u32 length). The
//! harness writes it out, fixes the manifest's sizes and checksums when the manifest is JSON
//! and re-seals it with its own checksum (so the fuzzer gets past the checksums into the
//! parsers), and restores it into a tiny GPT.
//! Any error is fine; a panic, abort or hang is a bug.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle::{DType, Device};
use candle_train::checkpoint::{
    seal_manifest, sha256_hex, unseal_manifest, Checkpoint, Manifest, MANIFEST_FILE, MASTER_FILE, MODEL_FILE,
    OPTIMIZER_FILE,
};
use candle_train::{Gpt, GptConfig, LocalUpdater, OptimizerConfig};

/// The files of a checkpoint in input order.
pub const FILES: [&str; 4] = [MANIFEST_FILE, MODEL_FILE, MASTER_FILE, OPTIMIZER_FILE];

/// The tiny model every input is restored into.
pub fn model() -> &'static Gpt {
    static MODEL: OnceLock<Gpt> = OnceLock::new();
    MODEL.get_or_init(|| {
        let config = GptConfig { n_ctx: 8, n_embd: 8, n_layer: 1, n_head: 2, ..GptConfig::default() };
        Gpt::new(config, DType::BF16, &Device::Cpu, 0).expect("tiny model")
    })
}

/// Splits an input into the four files (missing parts are empty).
pub fn split(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    for _ in FILES {
        let len = match data {
            [a, b, c, d, rest @ ..] => {
                data = rest;
                u32::from_le_bytes([*a, *b, *c, *d]) as usize
            }
            _ => 0,
        };
        let len = len.min(data.len());
        parts.push(data[..len].to_vec());
        data = &data[len..];
    }
    parts
}

/// Joins four files into one input.
pub fn join(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend((p.len() as u32).to_le_bytes());
        out.extend(p);
    }
    out
}

fn scratch() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    base.join(format!("candle-fit-fuzz-{}", std::process::id())).join("step-00000001")
}

/// Parses `data` as a manifest, raw and sealed with its own checksum; returns whether the
/// sealed form parsed.
pub fn parse_manifest(data: &[u8]) -> bool {
    let path = Path::new("manifest.json");
    let _ = Manifest::parse(data, path);
    match seal_manifest(data) {
        Some(sealed) => Manifest::parse(&sealed, path).is_ok(),
        None => false,
    }
}

/// Writes the input out as a checkpoint and restores it; returns whether it loaded.
pub fn load(data: &[u8]) -> bool {
    let mut parts = split(data);
    // The fuzzer mutates the manifest's body; its checksum is fixed below like the files' (a
    // wrong checksum is refused at once and would hide the parsers behind it).
    let body = unseal_manifest(&parts[0]).map_or_else(|| parts[0].clone(), |(_, body)| body);
    if let Ok(mut manifest) = serde_json::from_slice::<serde_json::Value>(&body) {
        if let Some(files) = manifest.get_mut("files").and_then(|f| f.as_array_mut()) {
            for entry in files {
                let Some(i) = entry
                    .get("name")
                    .and_then(|n| n.as_str())
                    .and_then(|n| FILES.iter().position(|f| *f == n))
                else {
                    continue;
                };
                if i > 0 {
                    entry["bytes"] = parts[i].len().into();
                    entry["sha256"] = sha256_hex(&parts[i]).into();
                }
            }
            let body = serde_json::to_vec(&manifest).unwrap_or_default();
            parts[0] = seal_manifest(&body).unwrap_or(body);
        }
    }
    let dir = scratch();
    let _ = std::fs::create_dir_all(&dir);
    for (name, bytes) in FILES.iter().zip(&parts) {
        let _ = std::fs::write(dir.join(name), bytes);
    }
    let model = model();
    let Ok(mut updater) =
        LocalUpdater::from_config(model.parameters(), &OptimizerConfig::AdamW(Default::default()))
    else {
        return false;
    };
    Checkpoint::open(&dir).and_then(|c| c.restore(model.parameters(), &mut updater)).is_ok()
}

/// SmolLM2's chat template, which the data target renders chat records with.
const CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Feeds `data` to the data loaders: the first byte picks JSONL or CSV, the rest is the file;
/// chat records are split into spans, classification records resolved through their label map.
pub fn parse_data(data: &[u8]) {
    use candle_fit::datasets::{read_records_from, ChatTemplate, LabelMap, Record};
    let Some((&kind, body)) = data.split_first() else { return };
    let name = if kind % 2 == 0 { "fuzz.jsonl" } else { "fuzz.csv" };
    let Ok(records) = read_records_from(Path::new(name), body, None) else { return };
    let template = ChatTemplate::new(CHAT_TEMPLATE, "", "<|im_end|>").expect("the template parses");
    for (_, record) in &records.records {
        if let Record::Chat(messages) = record {
            let _ = template.spans(messages);
        }
    }
    if let Ok(map) = LabelMap::from_records(&records) {
        let _ = map.resolve(&records);
    }
}
