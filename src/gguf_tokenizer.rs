//! The tokenizer stored inside a GGUF file's metadata (`tokenizer.ggml.*`), rebuilt as a
//! Hugging Face `tokenizers` tokenizer: byte-level BPE with the file's vocabulary and merges,
//! the pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`, and its control tokens
//! as special tokens. Nothing is downloaded; the result can be written out as a
//! `tokenizer.json` next to a fine-tuned model.

use std::collections::HashMap;
use std::path::Path;

use candle::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

/// llama.cpp's token type for control tokens (`<|im_start|>`, `<|endoftext|>`).
const CONTROL: i32 = 3;
/// llama.cpp's token type for user-defined (added) tokens.
const USER_DEFINED: i32 = 4;

/// Why a GGUF file's tokenizer could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key is missing or of the wrong type.
    #[error("gguf tokenizer metadata `{key}`: {reason}")]
    Metadata {
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The file's tokenizer is of a kind this reader does not rebuild.
    #[error("gguf tokenizer `{key}` = `{value}` is not supported ({supported})")]
    Unsupported {
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is supported.
        supported: &'static str,
    },
    /// The `tokenizers` crate refused the rebuilt tokenizer, or failed to encode, decode or save.
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    /// A `tokenizer_config.json` field is unusable.
    #[error("{}: field `{field}`: {reason}", path.display())]
    Config {
        /// The file.
        path: std::path::PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// A causal language model's tokenizer: text to ids and back, without special-token
/// insertion (SmolLM2 adds no BOS token).
#[derive(Debug, Clone)]
pub struct LmTokenizer {
    tokenizer: tokenizers::Tokenizer,
    eos: Option<u32>,
    bos: Option<u32>,
    pad: Option<u32>,
    chat_template: Option<String>,
}

impl LmTokenizer {
    /// Rebuilds the tokenizer from GGUF metadata.
    ///
    /// # Errors
    /// [`TokenizerError::Metadata`] for a missing or mistyped key,
    /// [`TokenizerError::Unsupported`] for a tokenizer model other than byte-level BPE
    /// (`gpt2`) or a pre-tokenizer this reader does not know, [`TokenizerError::Tokenizers`]
    /// when the `tokenizers` crate refuses the result.
    pub fn from_gguf_metadata(metadata: &HashMap<String, Value>) -> Result<Self, TokenizerError> {
        let json = tokenizer_json(metadata)?;
        let text = serde_json::to_string(&json).map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let tokenizer: tokenizers::Tokenizer =
            text.parse().map_err(|e: tokenizers::Error| TokenizerError::Tokenizers(e.to_string()))?;
        let id = |key: &str| metadata.get(key).and_then(|v| v.to_u32().ok());
        let chat_template = metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
        Ok(Self {
            tokenizer,
            eos: id("tokenizer.ggml.eos_token_id"),
            bos: id("tokenizer.ggml.bos_token_id"),
            pad: id("tokenizer.ggml.padding_token_id"),
            chat_template,
        })
    }

    /// Loads a Hugging Face `tokenizer.json` and, when the file exists, the
    /// `tokenizer_config.json` beside it (its `bos_token`, `eos_token`, `pad_token` and
    /// `chat_template`; a token is a string or an object with `content`).
    ///
    /// # Errors
    /// [`TokenizerError::Tokenizers`] when `tokenizer.json` does not load,
    /// [`TokenizerError::Config`] naming the file and field of a bad `tokenizer_config.json`.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: &Path) -> Result<Self, TokenizerError> {
        let bytes = candle_train::io::read_bounded(tokenizer_json, 1 << 30)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TokenizerError::Tokenizers(format!("{}: {e}", tokenizer_json.display())))?;
        let mut this = Self { tokenizer, eos: None, bos: None, pad: None, chat_template: None };
        if !tokenizer_config.exists() {
            return Ok(this);
        }
        let bad = |field: &'static str, reason: String| TokenizerError::Config {
            path: tokenizer_config.to_path_buf(),
            field,
            reason,
        };
        let bytes = candle_train::io::read_bounded(tokenizer_config, 64 << 20)
            .map_err(|e| bad("(file)", e.to_string()))?;
        let config: Json = serde_json::from_slice(&bytes).map_err(|e| bad("(file)", e.to_string()))?;
        let token = |field: &'static str| -> Result<Option<u32>, TokenizerError> {
            let text = match config.get(field) {
                None | Some(Json::Null) => return Ok(None),
                Some(Json::String(s)) => s.as_str(),
                Some(Json::Object(o)) => o
                    .get("content")
                    .and_then(Json::as_str)
                    .ok_or_else(|| bad(field, "an object without a string `content`".into()))?,
                Some(_) => return Err(bad(field, "must be a string".into())),
            };
            this.tokenizer
                .token_to_id(text)
                .map(Some)
                .ok_or_else(|| bad(field, format!("`{text}` is not in tokenizer.json's vocabulary")))
        };
        let (bos, eos, pad) = (token("bos_token")?, token("eos_token")?, token("pad_token")?);
        let chat_template = match config.get("chat_template") {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad("chat_template", "must be a string".into())),
        };
        this.bos = bos;
        this.eos = eos;
        this.pad = pad;
        this.chat_template = chat_template;
        Ok(this)
    }

    /// This tokenizer with `bos` and `eos` as its beginning- and end-of-sequence ids where it
    /// names none (a Hugging Face GPT-2 folder gives them in `config.json` only, its
    /// `tokenizer_config.json` holding just `model_max_length`).
    pub fn or_special_ids(mut self, bos: Option<u32>, eos: Option<u32>) -> Self {
        self.bos = self.bos.or(bos);
        self.eos = self.eos.or(eos);
        self
    }

    /// The ids of `text`.
    ///
    /// # Errors
    /// [`TokenizerError::Tokenizers`] if the tokenizer fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding =
            self.tokenizer.encode(text, false).map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens kept).
    ///
    /// # Errors
    /// [`TokenizerError::Tokenizers`] if the tokenizer fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.tokenizer.decode(ids, false).map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    /// The token string of `id` (`Ġworld`), if it exists.
    pub fn token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The end-of-sequence id, when the file names one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The beginning-of-sequence id, when the file names one (it is not inserted by
    /// [`LmTokenizer::encode`]).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The padding id, when the file names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// The chat template's Jinja source (`tokenizer.chat_template` in a GGUF file,
    /// `chat_template` in `tokenizer_config.json`), when there is one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The `tokenizer_config.json` Hugging Face's `AutoTokenizer` reads beside
    /// `tokenizer.json`: the special tokens by string (`bos_token`, `eos_token`, `pad_token`;
    /// null where the tokenizer has none), no BOS/EOS insertion (as [`LmTokenizer::encode`]),
    /// the chat template when there is one, `model_max_length`, and every added token under
    /// `added_tokens_decoder`.
    pub fn tokenizer_config_json(&self, model_max_length: usize) -> Json {
        let name =
            |id: Option<u32>| id.and_then(|id| self.tokenizer.id_to_token(id)).map_or(Json::Null, Json::from);
        let added: serde_json::Map<String, Json> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, token)| {
                let entry = json!({
                    "content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                    "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special,
                });
                (id.to_string(), entry)
            })
            .collect();
        let mut config = json!({
            "add_bos_token": false,
            "add_eos_token": false,
            "added_tokens_decoder": added,
            "bos_token": name(self.bos),
            "eos_token": name(self.eos),
            "pad_token": name(self.pad),
            "unk_token": Json::Null,
            "clean_up_tokenization_spaces": false,
            "model_max_length": model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        if let (Some(template), Some(map)) = (&self.chat_template, config.as_object_mut()) {
            map.insert("chat_template".into(), json!(template));
        }
        config
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    ///
    /// # Errors
    /// [`TokenizerError::Tokenizers`] on a serialisation or I/O error.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.tokenizer.save(path, true).map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }
}

fn strings<'a>(
    metadata: &'a HashMap<String, Value>,
    key: &'static str,
) -> Result<Vec<&'a str>, TokenizerError> {
    let bad = |reason: String| TokenizerError::Metadata { key, reason };
    let values =
        metadata.get(key).ok_or_else(|| bad("missing".into()))?.to_vec().map_err(|e| bad(e.to_string()))?;
    values.iter().map(|v| v.to_string().map(String::as_str).map_err(|e| bad(e.to_string()))).collect()
}

fn string<'a>(metadata: &'a HashMap<String, Value>, key: &'static str) -> Result<&'a str, TokenizerError> {
    let bad = |reason: String| TokenizerError::Metadata { key, reason };
    metadata
        .get(key)
        .ok_or_else(|| bad("missing".into()))?
        .to_string()
        .map(String::as_str)
        .map_err(|e| bad(e.to_string()))
}

/// The `tokenizer.json` (Hugging Face format) equivalent to the GGUF metadata.
fn tokenizer_json(metadata: &HashMap<String, Value>) -> Result<Json, TokenizerError> {
    let model = string(metadata, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(TokenizerError::Unsupported {
            key: "tokenizer.ggml.model",
            value: model.into(),
            supported: "only byte-level BPE, `gpt2`",
        });
    }
    let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
    let merges = strings(metadata, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec().and_then(|list| list.iter().map(Value::to_i32).collect()).map_err(|e| {
            TokenizerError::Metadata { key: "tokenizer.ggml.token_type", reason: e.to_string() }
        })?,
        None => Vec::new(),
    };
    // llama.cpp's pre-tokenizer regexes (llama-vocab.cpp): the StarCoder family splits every
    // digit first, then applies GPT-2's regex; `gpt2` applies GPT-2's regex alone.
    let pre =
        metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map_or("gpt2", String::as_str);
    let byte_level =
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        "smollm" | "starcoder" | "refact" | "codeshell" | "exaone" | "minerva" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
        "gpt2" | "gpt-2" => byte_level,
        other => {
            return Err(TokenizerError::Unsupported {
                key: "tokenizer.ggml.pre",
                value: other.into(),
                supported: "smollm, starcoder, refact, codeshell, exaone, minerva, gpt2",
            })
        }
    };
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        // A repeated string keeps its first id, as a map from strings can hold only one.
        vocab.entry(token.to_string()).or_insert(json!(id));
    }
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(id, _)| matches!(types.get(*id), Some(&CONTROL) | Some(&USER_DEFINED)))
        .map(|(id, token)| {
            json!({
                "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": types.get(id) == Some(&CONTROL),
            })
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}
