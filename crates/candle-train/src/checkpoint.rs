//! Crash-safe training-state checkpoints.
//!
//! A run directory holds checkpoints `step-00000042/`, each with
//!
//! - `model.safetensors`: the parameters in their dtype, under their (Hugging Face) names;
//! - `master.safetensors`: the FP32 master weights of half-precision parameters;
//! - `optimizer.safetensors`: the optimizer's state (moments, step count);
//! - `manifest.json`: the format version, the progress (step, micro-batch split, loss scaler,
//!   skip counters), the settings that decide the trajectory (seed, sequence length, global
//!   batch, schedule, clipping, optimizer, corpus checksum), the parameter list, and the size
//!   and SHA-256 of every file.
//!
//! A checkpoint is written into a hidden temporary directory, every file and the directory
//! synced, then renamed into place, and only then are old checkpoints pruned: a crash at any
//! instant leaves every earlier checkpoint intact and never a torn `step-*` directory.
//! Data order and dropout are counter-based (keyed by seed, step and sample index), so the
//! step number and the seed are the whole data position and RNG state.
//!
//! Loading checks everything (version, checksums, parameter names, shapes and dtypes, the run's
//! settings, optimizer kind and buffer lengths) before anything is changed.
//!
//! A sharded (data-parallel) updater writes a sharded checkpoint instead
//! ([`Updater::save_sharded`]): one `rank-NNNNN.safetensors` per rank and the same manifest,
//! whose [`Manifest::sharded`] says so; candle-shard writes and reads them, with the helpers
//! here ([`write_synced`], [`install`]) and the same checks.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::loss_scale::{LossScalerConfig, LossScalerState};
use crate::optim::OptimizerState;
use crate::params::Parameters;
use crate::schedule::LrSchedule;
use crate::updater::{Updater, UpdaterState};

/// The manifest format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name in a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The parameters' file name.
pub const MODEL_FILE: &str = "model.safetensors";
/// The FP32 master weights' file name.
pub const MASTER_FILE: &str = "master.safetensors";
/// The optimizer state's file name.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const DATA_FILES: [&str; 3] = [MODEL_FILE, MASTER_FILE, OPTIMIZER_FILE];
const PREFIX: &str = "step-";

/// Where a run stands: enough, with the run's settings, to continue it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer-loop steps done, skipped ones included: the next step to run.
    pub step: u64,
    /// Steps skipped for a non-finite loss or gradient so far.
    pub skipped_steps: usize,
    /// Of them, the ones in a row just before this checkpoint.
    pub consecutive_skips: usize,
    /// The micro-batch in use (smaller than configured after out-of-memory recovery).
    pub micro_batch: usize,
    /// Micro-batches per step (so `micro_batch * accumulation_steps` is the global batch).
    pub accumulation_steps: usize,
    /// The loss scaler's state, under loss scaling.
    pub loss_scaler: Option<LossScalerState>,
}

/// The settings that decide a run's trajectory: a run resumes a checkpoint only when they all
/// match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// Seed of the data order and dropout (the only random streams).
    pub seed: u64,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per optimizer step.
    pub global_batch: usize,
    /// The learning-rate schedule (it includes the run's length).
    pub schedule: LrSchedule,
    /// Gradient clipping.
    pub max_grad_norm: Option<f64>,
    /// Dynamic loss scaling's settings, if on.
    pub loss_scaling: Option<LossScalerConfig>,
    /// The optimizer's name.
    pub optimizer: String,
    /// SHA-256 of the training split of the corpus, hex.
    pub corpus_sha256: String,
}

impl RunIdentity {
    /// `Ok` when `self` (this run) can continue a checkpoint written with `saved`.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the first setting that differs, with both values.
    pub fn check_continues(&self, saved: &RunIdentity, path: &Path) -> Result<()> {
        let differs = |what: &str, saved: String, this: String| {
            Err(Error::checkpoint(
                path,
                format!("it was written with {what} {saved}, but this run has {what} {this}"),
            ))
        };
        if saved.seed != self.seed {
            return differs("seed", saved.seed.to_string(), self.seed.to_string());
        }
        if saved.seq_len != self.seq_len {
            return differs("sequence length", saved.seq_len.to_string(), self.seq_len.to_string());
        }
        if saved.global_batch != self.global_batch {
            return differs(
                "global batch (micro-batch x accumulation)",
                saved.global_batch.to_string(),
                self.global_batch.to_string(),
            );
        }
        if saved.schedule != self.schedule {
            return differs(
                "learning-rate schedule (which includes the number of steps)",
                format!("{:?}", saved.schedule),
                format!("{:?}", self.schedule),
            );
        }
        if saved.max_grad_norm != self.max_grad_norm {
            return differs(
                "max_grad_norm",
                format!("{:?}", saved.max_grad_norm),
                format!("{:?}", self.max_grad_norm),
            );
        }
        if saved.loss_scaling != self.loss_scaling {
            return differs(
                "loss scaling",
                format!("{:?}", saved.loss_scaling),
                format!("{:?}", self.loss_scaling),
            );
        }
        if saved.optimizer != self.optimizer {
            return differs("optimizer", saved.optimizer.clone(), self.optimizer.clone());
        }
        if saved.corpus_sha256 != self.corpus_sha256 {
            return differs("corpus (SHA-256)", saved.corpus_sha256.clone(), self.corpus_sha256.clone());
        }
        Ok(())
    }
}

/// One parameter as the checkpoint holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParameterSpec {
    /// Its name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its dtype (`f32`, `bf16`, ...).
    pub dtype: String,
}

/// A file of the checkpoint with its size and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The file name inside the checkpoint directory.
    pub name: String,
    /// Its length in bytes.
    pub bytes: u64,
    /// Its SHA-256, hex (as `sha256sum` prints it).
    pub sha256: String,
}

/// A checkpoint's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// The library that wrote it.
    pub writer: String,
    /// Data-parallel ranks the state was spread over.
    pub world_size: usize,
    /// Where the run stood.
    pub progress: Progress,
    /// The settings that decide the trajectory.
    pub run: RunIdentity,
    /// The parameters, in the model's order.
    pub parameters: Vec<ParameterSpec>,
    /// The data files with sizes and checksums.
    pub files: Vec<FileEntry>,
    /// For a sharded checkpoint (one file per rank, [`rank_file`]), what its files hold; absent
    /// for a whole one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharded: Option<ShardedInfo>,
}

/// What a sharded checkpoint's rank files hold besides their tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardedInfo {
    /// The ZeRO stage that wrote it (informative: any stage reads it).
    pub stage: u8,
    /// The optimizer's name.
    pub optimizer: String,
    /// The optimizer's step count.
    pub optimizer_step: u64,
}

/// The file of rank `rank` in a sharded checkpoint.
pub fn rank_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

impl Manifest {
    /// Parses and checks a manifest: its version, that it lists exactly the expected files,
    /// and that its numbers are consistent.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] saying what is wrong (`path` names the file in the message).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        // The version first, so a newer format gets a clear message rather than a field error.
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::checkpoint(path, format!("manifest is not valid JSON: {e}")))?;
        match value.get("format_version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(Error::checkpoint(
                    path,
                    format!("format version {v}; this build reads version {FORMAT_VERSION}"),
                ))
            }
            None => return Err(Error::checkpoint(path, "manifest has no numeric `format_version`")),
        }
        let manifest: Manifest = serde_json::from_value(value)
            .map_err(|e| Error::checkpoint(path, format!("malformed manifest: {e}")))?;
        let mut names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        let rank_files: Vec<String> = match manifest.sharded {
            // Bounded so that a hostile manifest cannot make us allocate without limit.
            Some(_) if manifest.world_size <= 1 << 16 => (0..manifest.world_size).map(rank_file).collect(),
            Some(_) => return Err(Error::checkpoint(path, "implausible world size")),
            None => Vec::new(),
        };
        let mut expected: Vec<&str> = match manifest.sharded {
            Some(_) => rank_files.iter().map(String::as_str).collect(),
            None => DATA_FILES.to_vec(),
        };
        expected.sort_unstable();
        if names != expected {
            return Err(Error::checkpoint(
                path,
                format!("manifest lists files {names:?}; expected exactly {expected:?}"),
            ));
        }
        let p = &manifest.progress;
        if manifest.world_size == 0 || p.micro_batch == 0 || p.accumulation_steps == 0 {
            return Err(Error::checkpoint(
                path,
                "world size, micro-batch and accumulation steps must be positive",
            ));
        }
        if p.micro_batch.checked_mul(p.accumulation_steps) != Some(manifest.run.global_batch) {
            return Err(Error::checkpoint(
                path,
                format!(
                    "micro-batch {} x accumulation {} is not the global batch {}",
                    p.micro_batch, p.accumulation_steps, manifest.run.global_batch
                ),
            ));
        }
        if p.consecutive_skips > p.skipped_steps || p.skipped_steps as u64 > p.step {
            return Err(Error::checkpoint(path, "inconsistent skip counters"));
        }
        Ok(manifest)
    }

    /// The entry of data file `name`.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when the manifest does not list it.
    pub fn file(&self, name: &str) -> Result<&FileEntry> {
        self.files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| Error::checkpoint(name, "not listed in the manifest"))
    }
}

/// The hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The parameter list of `params` as a checkpoint records it.
pub fn parameter_specs(params: &Parameters) -> Vec<ParameterSpec> {
    params
        .iter()
        .map(|p| ParameterSpec {
            name: p.name.clone(),
            shape: p.var.dims().to_vec(),
            dtype: p.var.dtype().as_str().to_string(),
        })
        .collect()
}

/// The checkpoints in `run_dir` as (step, directory), oldest first. Hidden temporaries of
/// interrupted writes are not listed.
///
/// # Errors
/// [`Error::Io`] if the directory cannot be listed.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(run_dir).map_err(|e| Error::io("list", run_dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", run_dir, e))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|s| s.parse().ok())
        else {
            continue;
        };
        if entry.path().join(MANIFEST_FILE).is_file() {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The checkpoint directory `path` names: `path` itself when it holds a manifest, else the
/// newest checkpoint of the run directory `path`.
///
/// # Errors
/// [`Error::Checkpoint`] when `path` is neither, or holds no checkpoint.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(MANIFEST_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(Error::checkpoint(path, "no such checkpoint or run directory"));
    }
    list_checkpoints(path)?
        .pop()
        .map(|(_, dir)| dir)
        .ok_or_else(|| Error::checkpoint(path, "the directory holds no checkpoint (no step-*/manifest.json)"))
}

/// The run directory of `path`: `path`'s parent when `path` is a checkpoint directory (holds a
/// manifest), else `path` itself.
pub fn run_dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if path.join(MANIFEST_FILE).is_file() => {
            if parent.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                parent.to_path_buf()
            }
        }
        _ => path.to_path_buf(),
    }
}

/// Writes one file and syncs it.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = fs::File::create(path).map_err(|e| Error::io("create", path, e))?;
    file.write_all(bytes).map_err(|e| Error::io("write", path, e))?;
    file.sync_all().map_err(|e| Error::io("sync", path, e))
}

/// Syncs a directory so the renames and creations in it are durable.
///
/// # Errors
/// [`Error::Io`] naming the directory.
pub fn sync_dir(path: &Path) -> Result<()> {
    fs::File::open(path).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync", path, e))
}

fn serialize(tensors: Vec<(String, Tensor)>, path: &Path) -> Result<Vec<u8>> {
    safetensors::serialize(tensors, None)
        .map_err(|e| Error::MalformedState { path: path.to_path_buf(), reason: e.to_string() })
}

/// Saves a checkpoint of `params` and `updater` at `progress.step` into `run_dir` (created if
/// needed), then removes all but the newest `keep` checkpoints. Returns the new checkpoint's
/// directory.
///
/// # Errors
/// [`Error::InvalidConfig`] when `keep` is 0, [`Error::Io`] naming the file on any write
/// failure (earlier checkpoints are then untouched), or when the updater cannot export state.
pub fn save(
    run_dir: &Path,
    keep: usize,
    params: &Parameters,
    updater: &dyn Updater,
    progress: Progress,
    run: RunIdentity,
) -> Result<PathBuf> {
    if keep == 0 {
        return Err(Error::config("keep_checkpoints", "must be at least 1"));
    }
    let step = progress.step;
    let tmp = temporary_dir(run_dir, step, &std::process::id().to_string())?;
    let written = (|| {
        let state = updater.save_state()?;
        let model: Vec<(String, Tensor)> =
            params.iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect();
        let master = state
            .master_weights
            .iter()
            .map(|(name, values)| Ok((name.clone(), Tensor::from_slice(values, values.len(), &Device::Cpu)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut files = Vec::new();
        for (file, tensors) in [(MODEL_FILE, model), (MASTER_FILE, master)] {
            let path = tmp.join(file);
            let bytes = serialize(tensors, &path)?;
            write_synced(&path, &bytes)?;
            files.push(FileEntry {
                name: file.into(),
                bytes: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
            });
        }
        let path = tmp.join(OPTIMIZER_FILE);
        state.optimizer.save(&path)?;
        let bytes = fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        files.push(FileEntry {
            name: OPTIMIZER_FILE.into(),
            bytes: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
        });
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            writer: format!("candle-train {}", env!("CARGO_PKG_VERSION")),
            world_size: updater.world_size(),
            progress,
            run,
            parameters: parameter_specs(params),
            files,
            sharded: None,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::checkpoint(&tmp, format!("cannot encode the manifest: {e}")))?;
        write_synced(&tmp.join(MANIFEST_FILE), &json)?;
        sync_dir(&tmp)
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    install(run_dir, &tmp, step, keep)
}

/// The directory name of the checkpoint of step `step` (`step-00000042`).
pub fn checkpoint_name(step: u64) -> String {
    format!("{PREFIX}{step:08}")
}

/// Prepares an empty hidden temporary directory `run_dir/.tmp-step-NNNNNNNN-{tag}` for the
/// checkpoint of `step` (stale temporaries of interrupted writes are removed first).
///
/// # Errors
/// [`Error::Io`] naming the directory.
pub fn temporary_dir(run_dir: &Path, step: u64, tag: &str) -> Result<PathBuf> {
    fs::create_dir_all(run_dir).map_err(|e| Error::io("create", run_dir, e))?;
    remove_stale_temporaries(run_dir)?;
    let tmp = run_dir.join(format!(".tmp-{}-{tag}", checkpoint_name(step)));
    fs::create_dir(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
    Ok(tmp)
}

/// Moves the complete, synced temporary directory `tmp` into place as the checkpoint of
/// `step` in `run_dir` (replacing one of the same step), syncs `run_dir`, then removes all
/// but the newest `keep` checkpoints. Returns the checkpoint's directory.
///
/// # Errors
/// [`Error::Io`] naming the file on failure.
pub fn install(run_dir: &Path, tmp: &Path, step: u64, keep: usize) -> Result<PathBuf> {
    let name = checkpoint_name(step);
    let final_dir = run_dir.join(&name);
    // A checkpoint of the same step (a run resumed from before it) moves aside first: a
    // directory cannot be renamed over a non-empty one.
    let trash = run_dir.join(format!(".old-{name}-{}", std::process::id()));
    if final_dir.exists() {
        fs::rename(&final_dir, &trash).map_err(|e| Error::io("move aside", &final_dir, e))?;
    }
    fs::rename(tmp, &final_dir).map_err(|e| Error::io("rename into", &final_dir, e))?;
    sync_dir(run_dir)?;
    if trash.exists() {
        fs::remove_dir_all(&trash).map_err(|e| Error::io("remove", &trash, e))?;
    }
    let all = list_checkpoints(run_dir)?;
    for (_, old) in &all[..all.len().saturating_sub(keep)] {
        fs::remove_dir_all(old).map_err(|e| Error::io("remove", old, e))?;
    }
    Ok(final_dir)
}

/// Removes hidden temporaries that interrupted writes left in `run_dir`.
fn remove_stale_temporaries(run_dir: &Path) -> Result<()> {
    for entry in fs::read_dir(run_dir).map_err(|e| Error::io("list", run_dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", run_dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".tmp-step-") || name.starts_with(".old-step-") {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(|e| Error::io("remove", &path, e))?;
        }
    }
    Ok(())
}

/// A checkpoint on disk whose manifest has been read and checked.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Its directory.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Checkpoint {
    /// Opens the checkpoint `path` names (see [`resolve`]) and checks its manifest.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] or [`Error::Io`] saying what is wrong.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = resolve(path)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let bytes = fs::read(&manifest_path).map_err(|e| Error::io("read", &manifest_path, e))?;
        let manifest = Manifest::parse(&bytes, &manifest_path)?;
        Ok(Self { path: dir, manifest })
    }

    /// Reads data file `name` and checks its size and checksum against the manifest.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when it is not listed, truncated or corrupted; [`Error::Io`].
    pub fn read_verified(&self, name: &str) -> Result<Vec<u8>> {
        let entry = self.manifest.file(name)?;
        let path = self.path.join(name);
        let bytes = fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        if bytes.len() as u64 != entry.bytes {
            return Err(Error::checkpoint(
                &path,
                format!("{} bytes, the manifest says {} (truncated or torn)", bytes.len(), entry.bytes),
            ));
        }
        let sum = sha256_hex(&bytes);
        if sum != entry.sha256 {
            return Err(Error::checkpoint(
                &path,
                format!("SHA-256 {sum} does not match the manifest's {} (corrupted)", entry.sha256),
            ));
        }
        Ok(bytes)
    }

    /// Checks every data file's size and checksum.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the first file that does not match.
    pub fn verify(&self) -> Result<()> {
        for entry in &self.manifest.files {
            self.read_verified(&entry.name)?;
        }
        Ok(())
    }

    /// Restores `params` and `updater` from this checkpoint. Everything (checksums, parameter
    /// names, shapes and dtypes, world size, master weights, optimizer kind and buffers) is
    /// checked before anything changes; on error both are as they were.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] or [`Error::StateMismatch`] naming the problem.
    pub fn restore(&self, params: &Parameters, updater: &mut dyn Updater) -> Result<()> {
        let m = &self.manifest;
        if m.sharded.is_some() || updater.sharded_checkpoints() {
            if m.sharded.is_none() {
                return Err(Error::checkpoint(
                    &self.path,
                    "it is a single-device checkpoint; a sharded run resumes only sharded checkpoints",
                ));
            }
            check_parameters(&m.parameters, &parameter_specs(params), &self.path)?;
            return updater.restore_sharded(self, params);
        }
        if m.world_size != updater.world_size() {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "it was written by {} ranks; this run has {} (resharding is not supported yet)",
                    m.world_size,
                    updater.world_size()
                ),
            ));
        }
        check_parameters(&m.parameters, &parameter_specs(params), &self.path)?;
        let model_bytes = self.read_verified(MODEL_FILE)?;
        let master_bytes = self.read_verified(MASTER_FILE)?;
        // Checked against the manifest, then parsed by the optimizer-state reader.
        self.read_verified(OPTIMIZER_FILE)?;
        let device = params.iter().next().map(|p| p.var.device().clone()).unwrap_or(Device::Cpu);
        let values = parse_model(&model_bytes, &m.parameters, &device, &self.path.join(MODEL_FILE))?;
        let master_weights = parse_master(&master_bytes, &self.path.join(MASTER_FILE))?;
        let optimizer = OptimizerState::load(&self.path.join(OPTIMIZER_FILE))?;
        updater.load_state(UpdaterState { master_weights, optimizer })?;
        for (p, value) in params.iter().zip(values) {
            p.var.set(&value)?;
        }
        Ok(())
    }
}

/// `Ok` when the checkpoint's parameter list equals the model's.
fn check_parameters(saved: &[ParameterSpec], model: &[ParameterSpec], path: &Path) -> Result<()> {
    let by_name: HashMap<&str, &ParameterSpec> = saved.iter().map(|s| (s.name.as_str(), s)).collect();
    for spec in model {
        match by_name.get(spec.name.as_str()) {
            None => {
                return Err(Error::checkpoint(
                    path,
                    format!("it has no parameter `{}`: it was written for another model", spec.name),
                ))
            }
            Some(s) if s.shape != spec.shape || s.dtype != spec.dtype => {
                return Err(Error::checkpoint(
                    path,
                    format!(
                    "parameter `{}` is {} {:?} there but {} {:?} in this model (another model or precision)",
                    spec.name, s.dtype, s.shape, spec.dtype, spec.shape
                ),
                ))
            }
            Some(_) => {}
        }
    }
    if saved.len() != model.len() {
        return Err(Error::checkpoint(
            path,
            format!(
                "it has {} parameters, this model {}: it was written for another model",
                saved.len(),
                model.len()
            ),
        ));
    }
    Ok(())
}

/// Parses `model.safetensors`, requiring exactly the listed tensors with their shapes and
/// dtypes; returns them in the list's order on `device`.
pub fn parse_model(
    bytes: &[u8],
    specs: &[ParameterSpec],
    device: &Device,
    path: &Path,
) -> Result<Vec<Tensor>> {
    let malformed = |reason: String| Error::MalformedState { path: path.to_path_buf(), reason };
    let mut tensors: HashMap<String, Tensor> =
        candle::safetensors::load_buffer(bytes, device).map_err(|e| malformed(e.to_string()))?;
    let mut values = Vec::with_capacity(specs.len());
    for spec in specs {
        let t = tensors.remove(&spec.name).ok_or_else(|| Error::StateMismatch {
            name: spec.name.clone(),
            expected: format!("a {} tensor of shape {:?}", spec.dtype, spec.shape),
            found: "nothing".into(),
        })?;
        if t.dims() != spec.shape.as_slice() || t.dtype().as_str() != spec.dtype {
            return Err(Error::StateMismatch {
                name: spec.name.clone(),
                expected: format!("{} {:?}", spec.dtype, spec.shape),
                found: format!("{} {:?}", t.dtype().as_str(), t.dims()),
            });
        }
        values.push(t);
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(malformed(format!("unexpected tensor `{extra}`")));
    }
    Ok(values)
}

/// Parses `master.safetensors`: FP32 vectors by parameter name.
pub fn parse_master(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, Vec<f32>>> {
    let malformed = |reason: String| Error::MalformedState { path: path.to_path_buf(), reason };
    let tensors =
        candle::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| malformed(e.to_string()))?;
    tensors
        .into_iter()
        .map(|(name, t)| {
            if t.dtype() != DType::F32 || t.rank() != 1 {
                return Err(malformed(format!(
                    "`{name}` is {} {:?}, not a flat f32 vector",
                    t.dtype().as_str(),
                    t.dims()
                )));
            }
            Ok((name, t.to_vec1::<f32>()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_standard_test_vector() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    fn identity() -> RunIdentity {
        RunIdentity {
            seed: 1,
            seq_len: 8,
            global_batch: 4,
            schedule: LrSchedule::Constant { lr: 0.1 },
            max_grad_norm: Some(1.0),
            loss_scaling: None,
            optimizer: "adamw".into(),
            corpus_sha256: "00".into(),
        }
    }

    #[test]
    fn a_run_with_other_settings_cannot_continue_a_checkpoint() {
        let saved = identity();
        let path = Path::new("ckpt");
        assert!(identity().check_continues(&saved, path).is_ok());
        type Change = fn(&mut RunIdentity);
        let cases: [(&str, Change); 6] = [
            ("seed", |r| r.seed = 2),
            ("global batch", |r| r.global_batch = 8),
            ("schedule", |r| r.schedule = LrSchedule::Constant { lr: 0.2 }),
            ("loss scaling", |r| r.loss_scaling = Some(LossScalerConfig::default())),
            ("optimizer", |r| r.optimizer = "sgd".into()),
            ("corpus", |r| r.corpus_sha256 = "11".into()),
        ];
        for (what, change) in cases {
            let mut this = identity();
            change(&mut this);
            let e = this.check_continues(&saved, path).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(what)),
                "a different {what} must be refused: {e:?}"
            );
        }
    }

    #[test]
    fn manifests_of_another_version_or_with_odd_files_are_refused() {
        let path = Path::new("manifest.json");
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            writer: "test".into(),
            world_size: 1,
            progress: Progress {
                step: 3,
                skipped_steps: 0,
                consecutive_skips: 0,
                micro_batch: 2,
                accumulation_steps: 2,
                loss_scaler: None,
            },
            run: identity(),
            parameters: vec![],
            files: DATA_FILES
                .iter()
                .map(|n| FileEntry { name: (*n).into(), bytes: 0, sha256: String::new() })
                .collect(),
            sharded: None,
        };
        let encode = |m: &Manifest| serde_json::to_vec(m).unwrap_or_default();
        assert_eq!(Manifest::parse(&encode(&manifest), path).ok(), Some(manifest.clone()));
        let mut newer = manifest.clone();
        newer.format_version = FORMAT_VERSION + 1;
        let e = Manifest::parse(&encode(&newer), path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("format version 2"), "{e}");
        let mut odd = manifest.clone();
        odd.files[0].name = "../../etc/passwd".into();
        assert!(Manifest::parse(&encode(&odd), path).is_err());
        let mut split = manifest.clone();
        split.progress.micro_batch = 3;
        assert!(Manifest::parse(&encode(&split), path).is_err());
        for bad in [&b""[..], b"{", b"[]", b"{\"format_version\": \"1\"}", b"\xff\xfe"] {
            assert!(Manifest::parse(bad, path).is_err());
        }
    }
}
