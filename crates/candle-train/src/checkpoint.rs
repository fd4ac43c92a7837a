//! Crash-safe training-state checkpoints.
//!
//! A run directory holds checkpoints `step-00000042/`, each with
//!
//! - `model.safetensors`: the parameters in their dtype, under their (Hugging Face) names;
//! - `master.safetensors`: the FP32 master weights of half-precision parameters;
//! - `optimizer.safetensors`: the optimizer's state (moments, step count);
//! - `manifest.json`: its own SHA-256 first (`manifest_sha256`, over every other byte of the
//!   file), the format version, the progress (step, the optimizer's step count, micro-batch
//!   split, loss scaler, skip counters), the settings that decide the trajectory
//!   ([`RunIdentity`]: seed, global batch, schedule, clipping, loss scaling,
//!   the optimizer and its hyper-parameters, the model's whole config, the backward mode, the
//!   data's fingerprint), the parameter list, and the size and SHA-256 of every file.
//!
//! A checkpoint is written into a hidden temporary directory, every file and the directory
//! synced, then renamed into place, and only then are old checkpoints pruned, each renamed to a
//! hidden `.old-step-*` name (synced) before it is deleted: a crash at any instant leaves every
//! earlier checkpoint intact and never a torn `step-*` directory, only hidden leftovers that
//! the next save removes. A run directory is owned by one run at a time ([`RunLock`]).
//! Data order and dropout are counter-based (keyed by seed, step and sample index), so the
//! step number and the seed are the whole data position and RNG state.
//!
//! Loading checks everything (the manifest's checksum and version, the files' sizes from their
//! metadata and their checksums, parameter names, shapes and dtypes read from the safetensors
//! headers and matched by name, the run's settings, the optimizer's kind, step count and buffer
//! lengths) before anything is changed.
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
/// Version 3 replaced the byte corpus's `seq_len` and `corpus_sha256` in [`RunIdentity`] with
/// the data source's fingerprint ([`RunIdentity::data`]); version 2 checkpoints are refused,
/// naming their version.
pub const FORMAT_VERSION: u32 = 3;
/// The key of the manifest's own checksum, the first field of `manifest.json`.
pub const MANIFEST_CHECKSUM_KEY: &str = "manifest_sha256";
/// The run directory's lock file (see [`RunLock`]).
pub const LOCK_FILE: &str = "run.lock";
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
/// The largest `manifest.json` read (a manifest lists parameters and files: far less).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Where a run stands: enough, with the run's settings, to continue it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer-loop steps done, skipped ones included: the next step to run.
    pub step: u64,
    /// Steps the optimizer took (its step count: bias correction and the schedule's position);
    /// `step` minus the skipped ones. Cross-checked with the optimizer file's own count.
    pub optimizer_step: u64,
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
    /// Samples per optimizer step.
    pub global_batch: usize,
    /// The learning-rate schedule (it includes the run's length).
    pub schedule: LrSchedule,
    /// Gradient clipping.
    pub max_grad_norm: Option<f64>,
    /// Dynamic loss scaling's settings, if on.
    pub loss_scaling: Option<LossScalerConfig>,
    /// The optimizer's name.
    pub optimizer: String,
    /// The optimizer's hyper-parameters (betas, eps, weight decay, momentum, ...), as canonical
    /// JSON ([`crate::optim::Optimizer::settings`]).
    pub optimizer_settings: String,
    /// The model's architecture and its settings that decide the trajectory (heads, dropout,
    /// norm epsilon, ...), as canonical JSON ([`crate::TrainableModel::settings`]).
    pub model: String,
    /// Whether the backward runs segment by segment or as one graph (their gradients may differ
    /// in the last bits).
    pub backward: String,
    /// The training data's fingerprint ([`crate::source::DataSource::fingerprint`]: for the
    /// byte corpus, the sequence length and the SHA-256 of its training split).
    pub data: String,
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
        // Exhaustive: a new field is a compile error here until it is compared.
        let RunIdentity {
            seed,
            global_batch,
            schedule,
            max_grad_norm,
            loss_scaling,
            optimizer,
            optimizer_settings,
            model,
            backward,
            data,
        } = saved;
        if *seed != self.seed {
            return differs("seed", seed.to_string(), self.seed.to_string());
        }
        if *global_batch != self.global_batch {
            return differs(
                "global batch (micro-batch x accumulation)",
                global_batch.to_string(),
                self.global_batch.to_string(),
            );
        }
        if *schedule != self.schedule {
            return differs(
                "learning-rate schedule (which includes the number of steps)",
                format!("{schedule:?}"),
                format!("{:?}", self.schedule),
            );
        }
        if max_grad_norm.map(f64::to_bits) != self.max_grad_norm.map(f64::to_bits) {
            return differs(
                "max_grad_norm",
                format!("{max_grad_norm:?}"),
                format!("{:?}", self.max_grad_norm),
            );
        }
        if *loss_scaling != self.loss_scaling {
            return differs("loss scaling", format!("{loss_scaling:?}"), format!("{:?}", self.loss_scaling));
        }
        if *optimizer != self.optimizer {
            return differs("optimizer", optimizer.clone(), self.optimizer.clone());
        }
        if *optimizer_settings != self.optimizer_settings {
            return differs(
                "optimizer settings",
                optimizer_settings.clone(),
                self.optimizer_settings.clone(),
            );
        }
        if *model != self.model {
            return differs("model settings", model.clone(), self.model.clone());
        }
        if *backward != self.backward {
            return differs("backward mode", backward.clone(), self.backward.clone());
        }
        if *data != self.data {
            return differs("training data", data.clone(), self.data.clone());
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
    /// Encodes the manifest as `manifest.json` holds it: pretty JSON whose first field,
    /// [`MANIFEST_CHECKSUM_KEY`], is the SHA-256 of the rest ([`seal_manifest`]).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] when it cannot be encoded.
    pub fn encode(&self, path: &Path) -> Result<Vec<u8>> {
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::checkpoint(path, format!("cannot encode the manifest: {e}")))?;
        seal_manifest(&body).ok_or_else(|| Error::checkpoint(path, "the manifest is not a JSON object"))
    }

    /// Parses and checks a manifest: its own checksum (every byte of the file is covered), its
    /// version, that it lists exactly the expected files, and that its numbers are consistent.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] saying what is wrong (`path` names the file in the message).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let sealed = unseal_manifest(bytes);
        let body = match &sealed {
            Some((_, body)) => body.as_slice(),
            None => bytes,
        };
        // The version first, so a newer format gets a clear message rather than a field error.
        let value: serde_json::Value = serde_json::from_slice(body)
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
        match &sealed {
            None => {
                return Err(Error::checkpoint(
                    path,
                    format!("the manifest does not start with its checksum `{MANIFEST_CHECKSUM_KEY}`"),
                ))
            }
            Some((sum, body)) => {
                let actual = sha256_hex(body);
                if actual != *sum {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "the manifest's checksum {sum} does not match its contents ({actual}): it was edited or corrupted"
                        ),
                    ));
                }
            }
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
        if p.optimizer_step > p.step {
            return Err(Error::checkpoint(
                path,
                format!("the optimizer took {} steps in {} steps of the run", p.optimizer_step, p.step),
            ));
        }
        if p.loss_scaler.is_some() != manifest.run.loss_scaling.is_some() {
            return Err(Error::checkpoint(path, "loss scaler state and loss scaling settings disagree"));
        }
        if let Some(info) = &manifest.sharded {
            if info.optimizer_step != p.optimizer_step || info.optimizer != manifest.run.optimizer {
                return Err(Error::checkpoint(
                    path,
                    "the sharded optimizer's step or kind disagrees with the progress",
                ));
            }
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

/// `manifest.json`'s bytes for the JSON object `body` (`{...}`): `{"manifest_sha256": "<hex>",`
/// then `body` without its opening brace, where `<hex>` is the SHA-256 of `body`. `None` when
/// `body` is not an object with at least one field.
pub fn seal_manifest(body: &[u8]) -> Option<Vec<u8>> {
    let rest = body.strip_prefix(b"{")?;
    let first = rest.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first == b'}' {
        return None;
    }
    let mut out = format!("{{\"{MANIFEST_CHECKSUM_KEY}\": \"{}\",", sha256_hex(body)).into_bytes();
    out.extend_from_slice(rest);
    Some(out)
}

/// Undoes [`seal_manifest`]: the checksum and the body it covers, or `None` when `bytes` does
/// not start with a checksum field exactly as written.
pub fn unseal_manifest(bytes: &[u8]) -> Option<(String, Vec<u8>)> {
    let head = format!("{{\"{MANIFEST_CHECKSUM_KEY}\": \"");
    let rest = bytes.strip_prefix(head.as_bytes())?;
    let sum = rest.get(..64)?;
    if !sum.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
        return None;
    }
    let rest = rest[64..].strip_prefix(b"\",")?;
    let mut body = Vec::with_capacity(rest.len() + 1);
    body.push(b'{');
    body.extend_from_slice(rest);
    Some((String::from_utf8_lossy(sum).into_owned(), body))
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
            shape: p.dims().to_vec(),
            dtype: p.dtype().as_str().to_string(),
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
        let model = params
            .iter()
            .map(|p| Ok((p.name.clone(), p.var()?.as_tensor().clone())))
            .collect::<Result<Vec<_>>>()?;
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
        if state.optimizer.step != progress.optimizer_step {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "the optimizer's step count {} is not the progress's {}",
                    state.optimizer.step, progress.optimizer_step
                ),
            ));
        }
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
        let json = manifest.encode(&tmp)?;
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
/// but the newest `keep` checkpoints up to `step` and any later than `step`, so the one just
/// written is never pruned. Returns the checkpoint's directory.
///
/// Crash-safe: a directory named `step-*` is only ever complete. A replaced or pruned
/// checkpoint is first renamed to a hidden `.old-step-*` name (one atomic rename), the rename
/// synced, and only then deleted; a crash in between leaves a hidden `.old-step-*` directory,
/// which is not a checkpoint and which the next save removes.
///
/// # Errors
/// [`Error::Io`] naming the file on failure.
pub fn install(run_dir: &Path, tmp: &Path, step: u64, keep: usize) -> Result<PathBuf> {
    let name = checkpoint_name(step);
    let final_dir = run_dir.join(&name);
    // A checkpoint of the same step (a run resumed from before it) moves aside first: a
    // directory cannot be renamed over a non-empty one.
    let trash = aside_name(run_dir, &name);
    if final_dir.exists() {
        fs::rename(&final_dir, &trash).map_err(|e| Error::io("move aside", &final_dir, e))?;
    }
    fs::rename(tmp, &final_dir).map_err(|e| Error::io("rename into", &final_dir, e))?;
    sync_dir(run_dir)?;
    if trash.exists() {
        fs::remove_dir_all(&trash).map_err(|e| Error::io("remove", &trash, e))?;
    }
    // The new checkpoint stays, with the newest `keep - 1` before it. Later ones (left by the
    // run's earlier life when it was resumed from before them) go: this run's history replaces
    // them, and the newest checkpoint is always the one just written.
    let all = list_checkpoints(run_dir)?;
    let earlier: Vec<&PathBuf> = all.iter().filter(|(s, _)| *s < step).map(|(_, p)| p).collect();
    let mut old: Vec<PathBuf> = earlier[..earlier.len().saturating_sub(keep.saturating_sub(1))]
        .iter()
        .map(|p| (*p).clone())
        .collect();
    old.extend(all.iter().filter(|(s, _)| *s > step).map(|(_, p)| p.clone()));
    remove_checkpoints(run_dir, &old)?;
    Ok(final_dir)
}

/// The hidden name a checkpoint directory `name` is renamed to before it is deleted.
fn aside_name(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!(".old-{name}-{}", std::process::id()))
}

/// Removes the checkpoint directories `dirs` of `run_dir`: each is renamed to a hidden
/// `.old-step-*` name, the renames are synced, then the hidden directories are deleted. A crash
/// at any instant leaves each either complete under its `step-*` name or hidden.
///
/// # Errors
/// [`Error::Io`] naming the directory.
pub fn remove_checkpoints(run_dir: &Path, dirs: &[PathBuf]) -> Result<()> {
    remove_checkpoints_with(run_dir, dirs, &|p| fs::remove_dir_all(p))
}

/// [`remove_checkpoints`] with the final deletion done by `delete` (tests inject a crash there).
fn remove_checkpoints_with(
    run_dir: &Path,
    dirs: &[PathBuf],
    delete: &dyn Fn(&Path) -> std::io::Result<()>,
) -> Result<()> {
    let mut aside = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let hidden = aside_name(run_dir, &name);
        fs::rename(dir, &hidden).map_err(|e| Error::io("move aside", dir, e))?;
        aside.push(hidden);
    }
    if !aside.is_empty() {
        sync_dir(run_dir)?;
    }
    for hidden in aside {
        delete(&hidden).map_err(|e| Error::io("remove", &hidden, e))?;
    }
    Ok(())
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

/// Ownership of a run directory: an advisory lock (`flock`) on its [`LOCK_FILE`], held while
/// this value lives (the kernel releases it when the process ends, however it ends), with the
/// owner's pid and host written in the file for the message a second writer gets. The file
/// stays when the lock is released: a stale file without a lock owns nothing.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    _file: fs::File,
}

impl RunLock {
    /// Takes the lock of `run_dir` (created if needed) without waiting.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the owner when another process (or another handle in this
    /// one) holds it; [`Error::Io`] when the directory or the file cannot be created or written
    /// (so an unwritable run directory fails here, before training).
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        fs::create_dir_all(run_dir).map_err(|e| Error::io("create", run_dir, e))?;
        let path = run_dir.join(LOCK_FILE);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        match try_lock_exclusive(&file) {
            Ok(true) => {}
            Ok(false) => {
                let owner = crate::io::read_bounded(&path, 4096)
                    .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                    .unwrap_or_default();
                let owner = if owner.is_empty() { "an unknown process".to_string() } else { owner };
                return Err(Error::checkpoint(
                    run_dir,
                    format!(
                        "the run directory is in use by another run ({owner}, lock file {}); two runs must not write one directory",
                        path.display()
                    ),
                ));
            }
            Err(e) => return Err(Error::io("lock", &path, e)),
        }
        let owner = format!("pid {} on host {}\n", std::process::id(), host_name());
        file.set_len(0)
            .and_then(|()| file.write_all(owner.as_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io("write", &path, e))?;
        Ok(Self { path, _file: file })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes an exclusive advisory lock on `file` without waiting: `Ok(false)` when another open
/// file description (another process, or another handle in this one) holds it. The kernel
/// releases it when the file is closed, however the process ends.
#[cfg(unix)]
fn try_lock_exclusive(file: &fs::File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: `flock` only reads the descriptor number, which `file` keeps open for the
    // duration of the call; it touches no memory of ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Without `flock` (not Unix), the lock file records the owner but does not exclude.
#[cfg(not(unix))]
fn try_lock_exclusive(_file: &fs::File) -> std::io::Result<bool> {
    Ok(true)
}

/// This machine's name (for lock files), or `unknown`.
fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| crate::io::read_bounded(Path::new(p), 256).ok())
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
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
        let bytes = crate::io::read_bounded(&manifest_path, MAX_MANIFEST_BYTES)?;
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
        // The size from the file's metadata first; then never more than the manifest's size is
        // read (a file that never ends, a FIFO or a device, is refused before reading).
        if let Ok(meta) = fs::metadata(&path) {
            if meta.is_file() && meta.len() != entry.bytes {
                return Err(Error::checkpoint(
                    &path,
                    format!("{} bytes, the manifest says {} (truncated or torn)", meta.len(), entry.bytes),
                ));
            }
        }
        let bytes = crate::io::read_bounded(&path, entry.bytes)?;
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

    /// `Ok` when the checkpoint's parameter list (names, shapes, dtypes) is the model's.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming the first parameter that differs.
    pub fn check_model(&self, params: &Parameters) -> Result<()> {
        check_parameters(&self.manifest.parameters, &parameter_specs(params), &self.path)
    }

    /// Restores `params` and `updater` from this checkpoint. Everything (checksums, parameter
    /// names, shapes and dtypes read from the files' headers, world size, master weights,
    /// optimizer kind, step count and buffers) is checked before anything changes; values are
    /// matched to parameters by name; on error both are as they were.
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
        let optimizer_bytes = self.read_verified(OPTIMIZER_FILE)?;
        let device = params.device();
        let model_path = self.path.join(MODEL_FILE);
        let values = parse_model(&model_bytes, &m.parameters, &device, &model_path)?;
        let mut by_name: HashMap<&str, Tensor> =
            m.parameters.iter().map(|s| s.name.as_str()).zip(values).collect();
        // Every value, by name, with the live parameter's shape and dtype: checked before
        // anything changes, so applying them below cannot fail halfway for a shape.
        let mut ordered = Vec::with_capacity(params.len());
        for p in params.iter() {
            let value = by_name
                .remove(p.name.as_str())
                .ok_or_else(|| Error::checkpoint(&model_path, format!("it has no tensor `{}`", p.name)))?;
            if p.is_released() {
                return Err(Error::ParameterReleased { name: p.name.clone() });
            }
            if value.dims() != p.dims() || value.dtype() != p.dtype() {
                return Err(Error::StateMismatch {
                    name: p.name.clone(),
                    expected: format!("{} {:?}", p.dtype().as_str(), p.dims()),
                    found: format!("{} {:?}", value.dtype().as_str(), value.dims()),
                });
            }
            ordered.push(value);
        }
        let master_weights = parse_master(&master_bytes, &self.path.join(MASTER_FILE))?;
        let optimizer_path = self.path.join(OPTIMIZER_FILE);
        let optimizer = OptimizerState::from_bytes(&optimizer_bytes, &optimizer_path)?;
        if optimizer.step != m.progress.optimizer_step {
            return Err(Error::checkpoint(
                &optimizer_path,
                format!(
                    "it holds the optimizer's state after {} steps, the manifest says {} (a file from another checkpoint?)",
                    optimizer.step, m.progress.optimizer_step
                ),
            ));
        }
        // The updater checks the whole state (master weights by name, the optimizer's kind and
        // buffers) and changes nothing on error.
        updater.load_state(UpdaterState { master_weights, optimizer })?;
        for (p, value) in params.iter().zip(ordered) {
            p.var()?.set(&value)?;
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
            global_batch: 4,
            schedule: LrSchedule::Constant { lr: 0.1 },
            max_grad_norm: Some(1.0),
            loss_scaling: None,
            optimizer: "adamw".into(),
            optimizer_settings: "{}".into(),
            model: "{}".into(),
            backward: "segmented".into(),
            data: "bytes seq_len=8 sha256=00".into(),
        }
    }

    #[test]
    fn a_run_with_other_settings_cannot_continue_a_checkpoint() {
        let saved = identity();
        let path = Path::new("ckpt");
        assert!(identity().check_continues(&saved, path).is_ok());
        type Change = fn(&mut RunIdentity);
        let cases: [(&str, Change); 11] = [
            ("seed", |r| r.seed = 2),
            ("training data", |r| r.data = "bytes seq_len=16 sha256=00".into()),
            ("max_grad_norm", |r| r.max_grad_norm = None),
            ("optimizer settings", |r| r.optimizer_settings = "{\"weight_decay\":0.2}".into()),
            ("model settings", |r| r.model = "{\"n_head\":4}".into()),
            ("backward mode", |r| r.backward = "plain".into()),
            ("global batch", |r| r.global_batch = 8),
            ("schedule", |r| r.schedule = LrSchedule::Constant { lr: 0.2 }),
            ("loss scaling", |r| r.loss_scaling = Some(LossScalerConfig::default())),
            ("optimizer", |r| r.optimizer = "sgd".into()),
            ("training data", |r| r.data = "bytes seq_len=8 sha256=11".into()),
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

    fn manifest() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            writer: "test".into(),
            world_size: 1,
            progress: Progress {
                step: 3,
                optimizer_step: 3,
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
        }
    }

    #[test]
    fn manifests_of_another_version_or_with_odd_files_are_refused() {
        let path = Path::new("manifest.json");
        let manifest = manifest();
        let encode = |m: &Manifest| m.encode(path).unwrap_or_default();
        assert_eq!(Manifest::parse(&encode(&manifest), path).ok(), Some(manifest.clone()));
        let mut newer = manifest.clone();
        newer.format_version = FORMAT_VERSION + 1;
        let e = Manifest::parse(&encode(&newer), path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(&format!("format version {}", FORMAT_VERSION + 1)), "{e}");
        let mut odd = manifest.clone();
        odd.files[0].name = "../../etc/passwd".into();
        assert!(Manifest::parse(&encode(&odd), path).is_err());
        let mut split = manifest.clone();
        split.progress.micro_batch = 3;
        assert!(Manifest::parse(&encode(&split), path).is_err());
        let mut ahead = manifest.clone();
        ahead.progress.optimizer_step = 4;
        assert!(Manifest::parse(&encode(&ahead), path).is_err());
        for bad in [&b""[..], b"{", b"[]", b"{\"format_version\": \"1\"}", b"\xff\xfe"] {
            assert!(Manifest::parse(bad, path).is_err());
        }
    }

    #[test]
    fn every_byte_of_a_manifest_is_covered_by_its_checksum() {
        let path = Path::new("manifest.json");
        let sealed = manifest().encode(path).unwrap_or_default();
        assert!(sealed.starts_with(format!("{{\"{MANIFEST_CHECKSUM_KEY}\": \"").as_bytes()));
        assert!(Manifest::parse(&sealed, path).is_ok());
        // An edit of the progress (the step, here 3 -> 9), whitespace, or anything else.
        let text = String::from_utf8_lossy(&sealed).into_owned();
        for edited in [
            text.replacen("\"step\": 3", "\"step\": 9", 1),
            text.replacen("\"seed\": 1", "\"seed\": 2", 1),
            text.replacen(",\n  \"format_version\"", ", \"format_version\"", 1),
            format!("{text}\n"),
        ] {
            assert_ne!(edited, text);
            let e = Manifest::parse(edited.as_bytes(), path).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("does not match its contents") || e.contains("not valid JSON"), "{e}");
        }
        // Without its checksum (as version 1 wrote it, or edited out), refused by name.
        let body = serde_json::to_vec_pretty(&manifest()).unwrap_or_default();
        let e = Manifest::parse(&body, path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(MANIFEST_CHECKSUM_KEY), "{e}");
        // Sealing any other body gives a manifest that parses only if the body is valid.
        assert_eq!(seal_manifest(b"{}"), None);
        assert_eq!(unseal_manifest(&sealed).map(|(_, b)| b), Some(body));
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("candle-train-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    /// A fake complete checkpoint directory: a manifest and three data files.
    fn fake_checkpoint(run_dir: &Path, step: u64) -> Result<PathBuf> {
        let dir = run_dir.join(checkpoint_name(step));
        fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        for name in [MANIFEST_FILE, MODEL_FILE, MASTER_FILE, OPTIMIZER_FILE] {
            write_synced(&dir.join(name), b"x")?;
        }
        Ok(dir)
    }

    fn complete(dir: &Path) -> bool {
        [MANIFEST_FILE, MODEL_FILE, MASTER_FILE, OPTIMIZER_FILE].iter().all(|f| dir.join(f).is_file())
    }

    #[test]
    fn a_crash_while_pruning_never_leaves_an_incomplete_step_directory() -> Result<()> {
        let run_dir = scratch("prune");
        let old = fake_checkpoint(&run_dir, 1)?;
        fake_checkpoint(&run_dir, 2)?;
        // The deletion "crashes" after removing one file: had it run on the `step-*` directory
        // itself (as a plain `remove_dir_all` does), that directory would now be torn.
        let crash = |dir: &Path| -> std::io::Result<()> {
            fs::remove_file(dir.join(MODEL_FILE))?;
            Err(std::io::Error::other("killed"))
        };
        assert!(remove_checkpoints_with(&run_dir, std::slice::from_ref(&old), &crash).is_err());
        for (_, dir) in list_checkpoints(&run_dir)? {
            assert!(complete(&dir), "{} is a step directory with missing files", dir.display());
        }
        assert_eq!(list_checkpoints(&run_dir)?.into_iter().map(|(s, _)| s).collect::<Vec<_>>(), [2]);
        // The hidden leftover is removed by the next save's temporary directory.
        let tmp = temporary_dir(&run_dir, 3, "t")?;
        let names: Vec<String> = fs::read_dir(&run_dir)
            .map_err(|e| Error::io("list", &run_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(".old-")), "{names:?}");
        fs::remove_dir_all(&tmp).map_err(|e| Error::io("remove", &tmp, e))?;
        fs::remove_dir_all(&run_dir).map_err(|e| Error::io("remove", &run_dir, e))?;
        Ok(())
    }

    #[test]
    fn installing_keeps_the_new_checkpoint_and_the_newest_before_it() -> Result<()> {
        let run_dir = scratch("install");
        for step in [2, 4, 6, 8] {
            fake_checkpoint(&run_dir, step)?;
        }
        // A run resumed from step 4 writes step 5 with keep 1: 5 stays (the newest is always
        // the one just written); 2 and 4 are older, 6 and 8 are the replaced future.
        let tmp = temporary_dir(&run_dir, 5, "t")?;
        for name in [MANIFEST_FILE, MODEL_FILE, MASTER_FILE, OPTIMIZER_FILE] {
            write_synced(&tmp.join(name), b"x")?;
        }
        let dir = install(&run_dir, &tmp, 5, 1)?;
        let steps: Vec<u64> = list_checkpoints(&run_dir)?.into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [5]);
        assert!(complete(&dir));
        fs::remove_dir_all(&run_dir).map_err(|e| Error::io("remove", &run_dir, e))?;
        Ok(())
    }

    #[test]
    fn a_run_directory_has_one_owner_at_a_time() -> Result<()> {
        let run_dir = scratch("lock");
        let first = RunLock::acquire(&run_dir)?;
        let owner = fs::read_to_string(first.path()).map_err(|e| Error::io("read", first.path(), e))?;
        assert!(owner.contains(&format!("pid {}", std::process::id())), "{owner}");
        let e = RunLock::acquire(&run_dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("in use by another run") && e.contains(owner.trim()), "{e}");
        drop(first);
        let again = RunLock::acquire(&run_dir)?;
        drop(again);
        fs::remove_dir_all(&run_dir).map_err(|e| Error::io("remove", &run_dir, e))?;
        Ok(())
    }
}
