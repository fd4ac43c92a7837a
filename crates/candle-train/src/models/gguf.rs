//! Reading a LLaMA-family GGUF file (llama.cpp's format, as SmolLM2's package ships it) into
//! a trainable [`Llama`]: the shape from the metadata, every tensor dequantized to F32 and then
//! converted to the training dtype, renamed to Hugging Face names, and the query/key rows
//! taken from llama.cpp's interleaved rotary layout back to Hugging Face's half-split one.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle::quantized::gguf_file::{Content, Value};
use candle::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::layers::rotary::interleaved_to_half_split;
use crate::models::llama::{is_base_linear, Llama, LlamaConfig, EMBED_TOKENS};
use crate::quant::{BaseQuantization, QuantizedWeight};

/// An opened GGUF file: its metadata and tensor directory (no tensor data is read yet).
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl GgufFile {
    /// Reads the header, metadata and tensor directory of `path`.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be opened, [`Error::MalformedState`] if it is not GGUF.
    pub fn open(path: &Path) -> Result<Self> {
        // A FIFO or device is refused before it is opened (it would block or never end); the
        // header's own lengths are then bounded by candle's reader and the file's size.
        let meta = std::fs::metadata(path).map_err(|e| Error::io("open", path, e))?;
        if !meta.is_file() {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
            return Err(Error::io("open", path, e));
        }
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let content = Content::read(&mut BufReader::new(file)).map_err(|e| malformed(path, e))?;
        Ok(Self { path: path.to_path_buf(), content })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata (`general.architecture`, `llama.block_count`, `tokenizer.ggml.tokens`, ...).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The parsed header, for readers that need more than this type offers.
    pub fn content(&self) -> &Content {
        &self.content
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| self.bad(format!("metadata `{key}` is missing")))
    }

    fn get_usize(&self, key: &str) -> Result<usize> {
        let value = self.get(key)?;
        let n = value.to_u64().map_err(|e| self.bad(format!("`{key}`: {e}")))?;
        usize::try_from(n).map_err(|_| self.bad(format!("`{key}` = {n} does not fit in memory")))
    }

    fn get_f64(&self, key: &str) -> Result<f64> {
        let value = self.get(key)?;
        value
            .to_f32()
            .map(f64::from)
            .or_else(|_| value.to_f64())
            .map_err(|e| self.bad(format!("`{key}`: {e}")))
    }

    fn bad(&self, reason: String) -> Error {
        Error::MalformedState { path: self.path.clone(), reason }
    }

    /// The Hugging Face configuration the metadata describes.
    ///
    /// # Errors
    /// [`Error::MalformedState`] when a required key is missing or of the wrong type,
    /// [`Error::InvalidConfig`] for an architecture other than `llama`, a mixture of experts,
    /// partial rotary dimensions or rope scaling, which this model does not implement.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.get("general.architecture")?.to_string().map_err(|e| self.bad(e.to_string()))?;
        if arch != "llama" {
            return Err(Error::config(
                "general.architecture",
                format!("`{arch}` is not a LLaMA-family model"),
            ));
        }
        if self.content.metadata.get("llama.expert_count").and_then(|v| v.to_u32().ok()).unwrap_or(0) > 1 {
            return Err(Error::config("llama.expert_count", "mixtures of experts are not supported"));
        }
        if self.content.metadata.keys().any(|k| k.starts_with("llama.rope.scaling")) {
            return Err(Error::config("llama.rope.scaling", "rope scaling is not supported"));
        }
        let hidden_size = self.get_usize("llama.embedding_length")?;
        let num_attention_heads = self.get_usize("llama.attention.head_count")?;
        let embedding = self.tensor_dims("token_embd.weight")?;
        let vocab_size = match self.get_usize("llama.vocab_size") {
            Ok(n) => n,
            Err(_) => embedding.first().copied().unwrap_or(0),
        };
        let config = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: self.get_usize("llama.feed_forward_length")?,
            num_hidden_layers: self.get_usize("llama.block_count")?,
            num_attention_heads,
            num_key_value_heads: self
                .get_usize("llama.attention.head_count_kv")
                .unwrap_or(num_attention_heads),
            max_position_embeddings: self.get_usize("llama.context_length")?,
            rms_norm_eps: self.get_f64("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: self.get_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            hidden_act: "silu".into(),
            model_type: crate::models::DecoderFamily::Llama,
            head_dim: None,
            attention_bias: None,
            sliding_window: None,
            use_sliding_window: None,
            rope_scaling: None,
            extra: serde_json::Map::new(),
        };
        config.validate()?;
        if let Ok(rope_dim) = self.get_usize("llama.rope.dimension_count") {
            if rope_dim != config.head_dim() {
                return Err(Error::config(
                    "llama.rope.dimension_count",
                    format!(
                        "rotary over {rope_dim} of {} head dimensions is not supported",
                        config.head_dim()
                    ),
                ));
            }
        }
        Ok(config)
    }

    fn tensor_dims(&self, name: &str) -> Result<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims().to_vec())
            .ok_or_else(|| self.bad(format!("tensor `{name}` is missing")))
    }

    /// Every tensor of a LLaMA model, dequantized to F32, converted to `dtype` on `device`,
    /// under its Hugging Face name, with the query and key projections permuted back to the
    /// half-split rotary layout. Tensors with other names (such as llama.cpp's `rope_freqs`)
    /// are refused: the model would silently ignore them.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::MalformedState`] on a read or decode failure, naming the
    /// tensor; [`Error::InvalidConfig`] for a tensor this model has no place for.
    pub fn llama_tensors(
        &self,
        config: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let file = File::open(&self.path).map_err(|e| Error::io("open", &self.path, e))?;
        let mut reader = BufReader::new(file);
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        let mut tensors = HashMap::with_capacity(names.len());
        for name in names {
            let hf = hf_name(name).ok_or_else(|| {
                Error::config("gguf tensors", format!("`{name}` has no place in a LLaMA model"))
            })?;
            let value = self.dequantize(&mut reader, name, device)?;
            let value = if hf.ends_with("self_attn.q_proj.weight") {
                interleaved_to_half_split(&value, config.num_attention_heads)?
            } else if hf.ends_with("self_attn.k_proj.weight") {
                interleaved_to_half_split(&value, config.num_key_value_heads)?
            } else {
                value
            };
            tensors.insert(hf, value.to_dtype(dtype)?);
        }
        Ok(tensors)
    }

    fn dequantize<R: Read + Seek>(&self, reader: &mut R, name: &str, device: &Device) -> Result<Tensor> {
        let qtensor = self
            .content
            .tensor(reader, name, device)
            .map_err(|e| self.bad(format!("tensor `{name}`: {e}")))?;
        qtensor.dequantize(device).map_err(|e| self.bad(format!("dequantizing `{name}`: {e}")))
    }

    /// The model this file holds with its decoder layers' affine weights quantized (QLoRA's
    /// frozen base, [`crate::quant`]): [`BaseQuantization::Gguf`] keeps the file's own blocks
    /// (whatever their type: the bytes are copied, never dequantized; the query and key rows
    /// are permuted as whole rows back to the half-split rotary layout), the other modes
    /// dequantize each weight and quantize it again. The embedding, the norms and an untied
    /// head are dequantized to `dtype`, as [`GgufFile::llama`] does. Each weight's blocks are
    /// made on the host and moved to `device` before the next is read.
    ///
    /// # Errors
    /// As [`GgufFile::llama`]; a weight whose rows are not whole blocks of the chosen type.
    pub fn llama_quantized(
        &self,
        quantization: BaseQuantization,
        dtype: DType,
        device: &Device,
    ) -> Result<Llama> {
        let config = self.llama_config()?;
        let file = File::open(&self.path).map_err(|e| Error::io("open", &self.path, e))?;
        let mut reader = BufReader::new(file);
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        let mut tensors = HashMap::with_capacity(names.len());
        let mut quantized = Vec::new();
        for name in names {
            let hf = hf_name(name).ok_or_else(|| {
                Error::config("gguf tensors", format!("`{name}` has no place in a LLaMA model"))
            })?;
            let heads = if hf.ends_with("self_attn.q_proj.weight") {
                Some(config.num_attention_heads)
            } else if hf.ends_with("self_attn.k_proj.weight") {
                Some(config.num_key_value_heads)
            } else {
                None
            };
            if !is_base_linear(&hf) {
                tensors.insert(hf, self.dequantize(&mut reader, name, device)?.to_dtype(dtype)?);
                continue;
            }
            if quantization == BaseQuantization::Gguf {
                let qtensor = self
                    .content
                    .tensor(&mut reader, name, &Device::Cpu)
                    .map_err(|e| self.bad(format!("tensor `{name}`: {e}")))?;
                let rows = match heads {
                    Some(heads) => {
                        let (out, _) =
                            qtensor.shape().dims2().map_err(|e| self.bad(format!("`{name}`: {e}")))?;
                        Some(half_split_rows(out, heads).map_err(|e| self.bad(format!("`{name}`: {e}")))?)
                    }
                    None => None,
                };
                quantized
                    .push(QuantizedWeight::from_qtensor(&hf, &qtensor, rows.as_deref())?.to_device(device)?);
                continue;
            }
            let value = self.dequantize(&mut reader, name, &Device::Cpu)?;
            let value = match heads {
                Some(heads) => interleaved_to_half_split(&value, heads)?,
                None => value,
            };
            quantized.push(quantization.quantize(&hf, &value)?.to_device(device)?);
        }
        Llama::from_tensors_quantized(&config, tensors, quantized, dtype, device)
    }

    /// The model this file holds, in `dtype` on `device`.
    ///
    /// # Errors
    /// As [`GgufFile::llama_config`], [`GgufFile::llama_tensors`] and [`Llama::from_tensors`].
    pub fn llama(&self, dtype: DType, device: &Device) -> Result<Llama> {
        let config = self.llama_config()?;
        let tensors = self.llama_tensors(&config, dtype, device)?;
        Llama::from_tensors(&config, tensors, dtype, device)
    }
}

/// The row order that takes a `[rows, in]` query or key weight from llama.cpp's interleaved
/// rotary layout to Hugging Face's half-split one (what [`interleaved_to_half_split`] does to a
/// dense matrix): row `i` of the result is row `order[i]` of the file's.
///
/// # Errors
/// When the rows do not split into `heads` heads of an even dimension.
pub fn half_split_rows(rows: usize, heads: usize) -> candle::Result<Vec<usize>> {
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
        candle::bail!("cannot split {rows} rows into {heads} heads of an even dimension");
    }
    let half = rows / heads / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                order.push(h * 2 * half + i * 2 + j);
            }
        }
    }
    Ok(order)
}

fn malformed(path: &Path, e: candle::Error) -> Error {
    Error::MalformedState { path: path.to_path_buf(), reason: e.to_string() }
}

/// The Hugging Face name of a llama.cpp tensor name, `None` for a name a LLaMA model does not
/// have.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some(EMBED_TOKENS.into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_names_map_to_hugging_face_names() {
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("blk.12.ffn_up.weight").as_deref(), Some("model.layers.12.mlp.up_proj.weight"));
        assert_eq!(hf_name("blk.0.attn_k.weight").as_deref(), Some("model.layers.0.self_attn.k_proj.weight"));
        assert_eq!(hf_name("blk.x.attn_k.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn the_row_order_undoes_the_rotary_permutation() -> Result<()> {
        let dense = Tensor::arange(0f32, 16.0 * 3.0, &Device::Cpu)?.reshape((16, 3))?;
        let expected = interleaved_to_half_split(&dense, 2)?.to_vec2::<f32>()?;
        let order = half_split_rows(16, 2)?;
        let rows = dense.to_vec2::<f32>()?;
        let permuted: Vec<Vec<f32>> = order.iter().map(|&r| rows[r].clone()).collect();
        assert_eq!(permuted, expected);
        assert!(half_split_rows(16, 3).is_err());
        Ok(())
    }

    #[test]
    fn a_file_that_is_not_gguf_is_refused_with_its_path() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("candle-train-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let path = dir.join("not.gguf");
        std::fs::write(&path, b"definitely not a gguf file").map_err(|e| Error::io("write", &path, e))?;
        let err = GgufFile::open(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not.gguf"), "{err}");
        let missing =
            GgufFile::open(&dir.join("missing.gguf")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(missing.contains("missing.gguf"), "{missing}");
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))?;
        Ok(())
    }
}
