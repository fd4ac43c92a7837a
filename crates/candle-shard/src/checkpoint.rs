//! Sharded checkpoints: one `rank-NNNNN.safetensors` per rank and candle-train's
//! `manifest.json` (with [`ShardedInfo`]), written collectively and atomically, and read back
//! on any number of ranks.
//!
//! A rank's file holds its slice of every flat buffer, cut into the pieces of parameters it
//! covers (padding excluded): `value/{name}/{start}` is the FP32 value of parameter `name`'s
//! flattened elements `start..start + len` (the master weights of a half-precision parameter,
//! which the parameter is rounded from, or the F32 parameter itself), and `{buffer}/{name}/{start}`
//! the optimizer's elementwise buffer `buffer` (`exp_avg`, `exp_avg_sq`, `momentum`) for the
//! same elements. Every element of every parameter is in exactly one file, whatever the stage;
//! a run on N' ranks reads every file and keeps the elements it needs, so resuming on another
//! number of ranks (or another stage) continues the same trajectory.
//!
//! Writing: rank 0 prepares a hidden temporary directory; each rank writes and syncs its file;
//! the ranks all-gather each file's size and SHA-256 (or its failure); rank 0 writes the
//! manifest, syncs, renames the directory into place and prunes old checkpoints; a failure on
//! any rank fails every rank and leaves no `step-*` directory. Ranks in several processes must
//! share the run directory's file system.
//!
//! Reading checks sizes and checksums of every file, the parameter list, the optimizer's
//! kind, and that every needed element is present exactly once, before anything changes.
//! 8-bit optimizer state is blockwise, not elementwise: it is refused here.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle::{Device, Tensor};
use candle_train::checkpoint::{
    self, install, parameter_specs, rank_file, sha256_hex, sync_dir, temporary_dir, write_synced, Checkpoint,
    FileEntry, Manifest, Progress, RunIdentity, ShardedInfo, FORMAT_VERSION, MANIFEST_FILE,
};
use candle_train::optim::OptimizerState;
use candle_train::Parameters;

use crate::comm::Communicator;
use crate::error::{Error, Result};

/// One piece of a parameter a rank writes: the parameter's index and name, the elements, their
/// FP32 values and the optimizer's buffers for them (by buffer name).
pub(crate) struct SavedPiece {
    pub(crate) name: String,
    pub(crate) param_range: Range<usize>,
    pub(crate) values: Vec<f32>,
    pub(crate) buffers: Vec<(String, Vec<f32>)>,
}

/// The optimizer piece that holds the checkpoint piece `piece` of flat buffer `group`: its
/// optimizer index and the offset of `piece`'s first element in it. `owned` lists the rank's
/// optimizer pieces in optimizer order as `(group, param, param_range)` (stage 0: whole
/// parameters; the others: exactly the checkpoint's pieces).
///
/// # Errors
/// An internal error when no optimizer piece holds it.
pub(crate) fn owning_piece<'a>(
    owned: impl IntoIterator<Item = (usize, usize, &'a Range<usize>)>,
    group: usize,
    piece: &crate::partition::Piece,
) -> Result<(usize, usize)> {
    owned
        .into_iter()
        .enumerate()
        .find(|(_, (g, param, range))| {
            *g == group
                && *param == piece.param
                && range.start <= piece.param_range.start
                && piece.param_range.end <= range.end
        })
        .map(|(k, (_, _, range))| (k, piece.param_range.start - range.start))
        .ok_or_else(|| Error::config("checkpoint", "internal: a slice piece has no optimizer piece"))
}

/// Optimizer piece `k`'s buffers (of `owned_len` elements each) cut to `len` elements from
/// `offset`: what a checkpoint piece holds of them.
///
/// # Errors
/// A buffer that is not elementwise (another length than the piece's), named.
pub(crate) fn piece_buffers(
    buffers: &BuffersByIndex<'_>,
    kind: &str,
    k: usize,
    owned_len: usize,
    offset: usize,
    len: usize,
) -> Result<Vec<(String, Vec<f32>)>> {
    let mut out = Vec::new();
    for (base, values) in buffers.get(&k).map(Vec::as_slice).unwrap_or_default() {
        if values.len() != owned_len {
            return Err(Error::config(
                "checkpoint",
                format!("{kind} buffer `{base}` is not elementwise: it cannot be sharded"),
            ));
        }
        out.push((base.clone(), values[offset..offset + len].to_vec()));
    }
    Ok(out)
}

/// An optimizer's buffers by optimizer index: (buffer name, values).
pub(crate) type BuffersByIndex<'a> = HashMap<usize, Vec<(String, &'a [f32])>>;

/// The optimizer's elementwise buffers by (buffer name, optimizer index): `exp_avg.3` is
/// `("exp_avg", 3)`.
///
/// # Errors
/// When the state holds quantized (8-bit) buffers or names without an index.
pub(crate) fn buffers_by_index(state: &OptimizerState) -> Result<BuffersByIndex<'_>> {
    if !state.quantized.is_empty() {
        return Err(Error::config(
            "checkpoint",
            format!(
                "{} state is blockwise-quantized: sharded checkpoints hold elementwise state only",
                state.kind
            ),
        ));
    }
    let mut out = BuffersByIndex::new();
    for (name, values) in &state.buffers {
        let parsed = name.rsplit_once('.').and_then(|(base, k)| Some((base, k.parse::<usize>().ok()?)));
        let Some((base, k)) = parsed else {
            return Err(Error::config("checkpoint", format!("optimizer buffer `{name}` has no piece index")));
        };
        out.entry(k).or_default().push((base.to_string(), values.as_slice()));
    }
    Ok(out)
}

fn record(result: &Result<FileEntry>) -> [u8; 48] {
    let mut out = [0u8; 48];
    if let Ok(entry) = result {
        out[0] = 1;
        out[8..16].copy_from_slice(&entry.bytes.to_le_bytes());
        let mut sha = [0u8; 32];
        for (i, byte) in sha.iter_mut().enumerate() {
            *byte = u8::from_str_radix(entry.sha256.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0);
        }
        out[16..48].copy_from_slice(&sha);
    }
    out
}

fn failed(what: impl Into<String>) -> Error {
    Error::Train(candle_train::Error::config("checkpoint", what.into()))
}

/// Writes the sharded checkpoint of `progress.step` (see the module docs). Every rank calls it
/// with its own `pieces`; returns the checkpoint's directory.
#[allow(clippy::too_many_arguments)]
pub(crate) fn save(
    comm: &dyn Communicator,
    run_dir: &Path,
    keep: usize,
    params: &Parameters,
    pieces: Vec<SavedPiece>,
    info: ShardedInfo,
    progress: Progress,
    run: RunIdentity,
) -> Result<PathBuf> {
    let (rank, world_size) = (comm.rank(), comm.world_size());
    let step = progress.step;
    let tmp = run_dir.join(format!(".tmp-{}-sharded", checkpoint::checkpoint_name(step)));
    // Rank 0 prepares the directory; the others learn whether it could.
    let mut ready = [0u8];
    if rank == 0 {
        let prepared = if keep == 0 {
            Err(candle_train::Error::config("keep_checkpoints", "must be at least 1"))
        } else {
            temporary_dir(run_dir, step, "sharded")
        };
        ready[0] = u8::from(prepared.is_ok());
        comm.broadcast(&mut ready, 0)?;
        prepared?;
    } else {
        comm.broadcast(&mut ready, 0)?;
        if ready[0] == 0 {
            return Err(failed(format!("rank 0 could not prepare {}", tmp.display())));
        }
    }
    let written = write_rank_file(&tmp, rank, pieces);
    let mut records = vec![0u8; 48 * world_size];
    records[48 * rank..48 * (rank + 1)].copy_from_slice(&record(&written));
    comm.all_gather(&mut records)?;
    let failed_ranks: Vec<usize> = (0..world_size).filter(|r| records[48 * r] == 0).collect();
    if !failed_ranks.is_empty() {
        if rank == 0 {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written?;
        return Err(failed(format!("ranks {failed_ranks:?} could not write their checkpoint files")));
    }
    let mut done = [0u8];
    let mut outcome = Ok(run_dir.join(checkpoint::checkpoint_name(step)));
    if rank == 0 {
        let files = (0..world_size)
            .map(|r| {
                let rec = &records[48 * r..48 * (r + 1)];
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&rec[8..16]);
                FileEntry {
                    name: rank_file(r),
                    bytes: u64::from_le_bytes(bytes),
                    sha256: rec[16..48].iter().map(|b| format!("{b:02x}")).collect(),
                }
            })
            .collect();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            writer: format!("candle-shard {}", env!("CARGO_PKG_VERSION")),
            world_size,
            progress,
            run,
            parameters: parameter_specs(params),
            files,
            sharded: Some(info),
        };
        outcome = (|| -> Result<PathBuf> {
            let json = manifest.encode(&tmp)?;
            write_synced(&tmp.join(MANIFEST_FILE), &json)?;
            sync_dir(&tmp)?;
            Ok(install(run_dir, &tmp, step, keep)?)
        })();
        if outcome.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        done[0] = u8::from(outcome.is_ok());
    }
    comm.broadcast(&mut done, 0)?;
    if rank != 0 && done[0] == 0 {
        return Err(failed(format!("rank 0 could not complete the checkpoint in {}", run_dir.display())));
    }
    outcome
}

fn write_rank_file(dir: &Path, rank: usize, pieces: Vec<SavedPiece>) -> Result<FileEntry> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for piece in pieces {
        let start = piece.param_range.start;
        let len = piece.values.len();
        tensors.push((
            format!("value/{}/{start}", piece.name),
            Tensor::from_vec(piece.values, len, &Device::Cpu)?,
        ));
        for (buffer, values) in piece.buffers {
            let len = values.len();
            tensors.push((
                format!("{buffer}/{}/{start}", piece.name),
                Tensor::from_vec(values, len, &Device::Cpu)?,
            ));
        }
    }
    let name = rank_file(rank);
    let path = dir.join(&name);
    let bytes = safetensors::serialize(tensors, None)
        .map_err(|e| failed(format!("cannot encode {}: {e}", path.display())))?;
    write_synced(&path, &bytes)?;
    Ok(FileEntry { name, bytes: bytes.len() as u64, sha256: sha256_hex(&bytes) })
}

/// What a rank needs from a sharded checkpoint: `buffer` ("value" or an optimizer buffer) of
/// parameter `param` over `range`.
pub(crate) struct Need {
    pub(crate) buffer: String,
    pub(crate) param: usize,
    pub(crate) range: Range<usize>,
}

/// Reads every rank file of `ckpt` (each verified against the manifest) and returns, for each
/// of `needs`, its values.
///
/// # Errors
/// [`Error::Train`] with a checkpoint error when a file is torn or corrupted, malformed, or
/// when an element of a need is missing or present twice.
pub(crate) fn read(ckpt: &Checkpoint, params: &Parameters, needs: &[Need]) -> Result<Vec<Vec<f32>>> {
    let names: HashMap<&str, usize> = params.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
    let mut by_key: BTreeMap<(&str, usize), Vec<usize>> = BTreeMap::new();
    for (i, need) in needs.iter().enumerate() {
        by_key.entry((need.buffer.as_str(), need.param)).or_default().push(i);
    }
    let mut out: Vec<Vec<f32>> = needs.iter().map(|n| vec![0.0; n.range.len()]).collect();
    let mut filled = vec![0usize; needs.len()];
    let malformed = |file: &str, reason: String| {
        Error::Train(candle_train::Error::MalformedState { path: ckpt.path.join(file), reason })
    };
    for entry in &ckpt.manifest.files {
        let bytes = ckpt.read_verified(&entry.name)?;
        let tensors = candle::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| malformed(&entry.name, e.to_string()))?;
        drop(bytes);
        for (key, tensor) in tensors {
            let parsed = key.split_once('/').and_then(|(buffer, rest)| {
                let (name, start) = rest.rsplit_once('/')?;
                Some((buffer, name, start.parse::<usize>().ok()?))
            });
            let Some((buffer, name, start)) = parsed else {
                return Err(malformed(&entry.name, format!("unexpected tensor `{key}`")));
            };
            let Some(&param) = names.get(name) else {
                return Err(malformed(&entry.name, format!("`{key}` names no parameter of this model")));
            };
            let Some(targets) = by_key.get(&(buffer, param)) else {
                if buffer == "value" || needs.iter().any(|n| n.buffer == buffer) {
                    continue;
                }
                return Err(malformed(
                    &entry.name,
                    format!("`{key}`: buffer `{buffer}` is not this optimizer's"),
                ));
            };
            if tensor.dtype() != candle::DType::F32 || tensor.rank() != 1 {
                return Err(malformed(&entry.name, format!("`{key}` is not a flat f32 vector")));
            }
            let values = tensor.to_vec1::<f32>()?;
            let saved = start..start.saturating_add(values.len());
            if saved.end > params.iter().nth(param).map_or(0, |p| p.elem_count()) {
                return Err(malformed(&entry.name, format!("`{key}` runs past the parameter's end")));
            }
            for &i in targets {
                let want = &needs[i].range;
                let (lo, hi) = (saved.start.max(want.start), saved.end.min(want.end));
                if lo < hi {
                    out[i][lo - want.start..hi - want.start]
                        .copy_from_slice(&values[lo - saved.start..hi - saved.start]);
                    filled[i] += hi - lo;
                }
            }
        }
    }
    for (need, &count) in needs.iter().zip(&filled) {
        if count != need.range.len() {
            let name = params.iter().nth(need.param).map_or("?", |p| p.name.as_str());
            return Err(failed(format!(
                "{}: {} of `{name}` elements {:?} found {count} times over, expected once each (missing or duplicated pieces)",
                ckpt.path.display(),
                need.buffer,
                need.range
            )));
        }
    }
    Ok(out)
}
