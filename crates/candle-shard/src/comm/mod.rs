//! The [`Communicator`] trait: collectives between data-parallel ranks, each with a timeout,
//! and the bytes they move ([`CommStats`]).
//!
//! Backends: [`local`], an in-process group of threads (any device; how every sharding test
//! runs on CPU), and [`tcp`], one process per rank on CPU, meeting at the launcher's
//! `MASTER_ADDR:MASTER_PORT`. An NCCL backend is not part of this build (see the crate docs).

pub mod local;
pub mod tcp;

use candle::{DType, Tensor};
use std::fmt;
use std::time::Duration;

pub use local::{LocalCommunicator, LocalGroup};
pub use tcp::TcpCommunicator;

use crate::error::CommError;

/// A collective operation, for errors and statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Sum of every rank's buffer, on every rank.
    AllReduce,
    /// Sum of every rank's buffer, on one root rank.
    Reduce,
    /// Sum of every rank's buffer, each rank keeping its own chunk.
    ReduceScatter,
    /// Every rank's chunk, on every rank.
    AllGather,
    /// The root's buffer, on every rank.
    Broadcast,
    /// Waits for every rank.
    Barrier,
}

impl Op {
    /// Every operation, in the order [`CommStats`] stores them.
    pub const ALL: [Op; 6] =
        [Op::AllReduce, Op::Reduce, Op::ReduceScatter, Op::AllGather, Op::Broadcast, Op::Barrier];

    fn index(self) -> usize {
        self as usize
    }

    /// The operation's name (`all_reduce`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::Reduce => "reduce",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Calls and bytes of one operation on one rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Calls made.
    pub calls: u64,
    /// Bytes of the buffers handed to those calls (the whole buffer: for reduce-scatter and
    /// all-gather, all `world_size` chunks).
    pub buffer_bytes: u64,
    /// Bytes a bandwidth-optimal (ring) implementation sends from this rank for those calls,
    /// the convention NCCL's bus bandwidth uses: all-reduce `2 (N-1)/N B`, reduce-scatter and
    /// all-gather `(N-1)/N B`, reduce and broadcast `B` (a pipelined ring), barrier 0, for a
    /// buffer of `B` bytes on `N` ranks. This is what the theory (2P per step for ZeRO 0-2) counts.
    pub sent_bytes: u64,
}

/// What one rank's communicator has done, per operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommStats {
    ops: [OpStats; 6],
}

impl CommStats {
    /// The statistics of one operation.
    pub fn op(&self, op: Op) -> OpStats {
        self.ops[op.index()]
    }

    /// Calls of every operation.
    pub fn calls(&self) -> u64 {
        self.ops.iter().map(|o| o.calls).sum()
    }

    /// Bytes sent by a ring implementation, over every operation.
    pub fn sent_bytes(&self) -> u64 {
        self.ops.iter().map(|o| o.sent_bytes).sum()
    }

    /// The difference `self - earlier` (statistics of the calls made in between).
    pub fn since(&self, earlier: &CommStats) -> CommStats {
        let mut out = *self;
        for (o, e) in out.ops.iter_mut().zip(&earlier.ops) {
            o.calls -= e.calls;
            o.buffer_bytes -= e.buffer_bytes;
            o.sent_bytes -= e.sent_bytes;
        }
        out
    }

    /// Records one call of `op` on a buffer of `bytes` bytes among `world_size` ranks.
    pub fn record(&mut self, op: Op, bytes: usize, world_size: usize) {
        let (b, n) = (bytes as u64, world_size as u64);
        let sent = match op {
            Op::AllReduce => 2 * b * (n - 1) / n,
            Op::ReduceScatter | Op::AllGather => b * (n - 1) / n,
            Op::Reduce | Op::Broadcast if n > 1 => b,
            Op::Reduce | Op::Broadcast | Op::Barrier => 0,
        };
        let o = &mut self.ops[op.index()];
        o.calls += 1;
        o.buffer_bytes += b;
        o.sent_bytes += sent;
    }
}

/// Collectives between the ranks of one group. Every call blocks until every rank has made
/// the same call (same operation, same length), and fails with a [`CommError`] instead of
/// hanging when a peer does not arrive within [`Communicator::timeout`], has left the group,
/// or called something else. After a failure every later call fails too.
///
/// Reductions are sums, in FP32 or FP64; every rank gets bit-identical results (the order of
/// the sum does not depend on the rank), so decisions taken from them agree.
pub trait Communicator: Send {
    /// This rank, in `0..world_size`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// How long any one call waits for its peers.
    fn timeout(&self) -> Duration;

    /// Replaces `values` by the sum over ranks of their `values`.
    ///
    /// # Errors
    /// A [`CommError`] when a peer times out, has left, or mismatches.
    fn all_reduce_f32(&self, values: &mut [f32]) -> Result<(), CommError>;

    /// As [`Communicator::all_reduce_f32`], in FP64 (norms, flags, counts).
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_f32`].
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<(), CommError>;

    /// Replaces the root's `values` by the sum over ranks of their `values`; the other ranks'
    /// `values` are left unspecified.
    ///
    /// # Errors
    /// [`CommError::BadRoot`], or as [`Communicator::all_reduce_f32`].
    fn reduce_f32(&self, values: &mut [f32], root: usize) -> Result<(), CommError>;

    /// In place: `values` is cut into `world_size` equal chunks; on return, chunk `rank` holds
    /// the sum over ranks of their chunk `rank` (NCCL's in-place reduce-scatter). The other
    /// chunks are left unspecified.
    ///
    /// # Errors
    /// [`CommError::BadLength`] when the length is not a multiple of the world size, or as
    /// [`Communicator::all_reduce_f32`].
    fn reduce_scatter_f32(&self, values: &mut [f32]) -> Result<(), CommError>;

    /// In place: `bytes` is cut into `world_size` equal chunks; each rank supplies its chunk
    /// `rank`, and on return every chunk holds its owner's bytes (NCCL's in-place all-gather).
    ///
    /// # Errors
    /// As [`Communicator::reduce_scatter_f32`].
    fn all_gather(&self, bytes: &mut [u8]) -> Result<(), CommError>;

    /// Replaces `bytes` by the root's.
    ///
    /// # Errors
    /// [`CommError::BadRoot`], or as [`Communicator::all_reduce_f32`].
    fn broadcast(&self, bytes: &mut [u8], root: usize) -> Result<(), CommError>;

    /// Returns when every rank has called it.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce_f32`].
    fn barrier(&self) -> Result<(), CommError>;

    /// What this rank has communicated so far.
    fn stats(&self) -> CommStats;

    /// Bytes this rank has copied between host memory and a device to run its collectives so
    /// far (both directions): the NCCL backend stages host slices through the GPU; the
    /// in-process and TCP backends work in host memory (0).
    fn host_staged_bytes(&self) -> u64 {
        0
    }

    /// The sum over ranks of an F32 tensor (any shape), as a new tensor on its device. The
    /// default runs [`Communicator::all_reduce_f32`] on a host copy (no copy at all for a
    /// contiguous CPU tensor's values beyond the one the result needs); the NCCL backend
    /// reduces device memory directly.
    ///
    /// # Errors
    /// A tensor that is not F32, or as [`Communicator::all_reduce_f32`].
    fn all_reduce_tensor(&self, t: &Tensor) -> crate::Result<Tensor> {
        let mut values = host_f32(t, "all_reduce_tensor")?;
        self.all_reduce_f32(&mut values)?;
        Ok(Tensor::from_vec(values, t.shape(), t.device())?)
    }

    /// A 1-D F32 tensor cut into `world_size` equal chunks: returns this rank's chunk of the
    /// sum over ranks (NCCL's reduce-scatter), on the tensor's device.
    ///
    /// # Errors
    /// A tensor that is not 1-D F32, a length that does not split evenly, or as
    /// [`Communicator::reduce_scatter_f32`].
    fn reduce_scatter_tensor(&self, t: &Tensor) -> crate::Result<Tensor> {
        let mut values = host_f32(t, "reduce_scatter_tensor")?;
        self.reduce_scatter_f32(&mut values)?;
        let chunk = values.len() / self.world_size().max(1);
        let mine = &values[self.rank() * chunk..(self.rank() + 1) * chunk];
        Ok(Tensor::from_slice(mine, chunk, t.device())?)
    }

    /// Every rank's 1-D tensor (F32, BF16 or F16; the same length everywhere), concatenated in
    /// rank order on this rank's device (NCCL's all-gather).
    ///
    /// # Errors
    /// A tensor that is not 1-D or of another dtype, or as [`Communicator::all_gather`].
    fn all_gather_tensor(&self, t: &Tensor) -> crate::Result<Tensor> {
        let (n, world, rank) = (t.elem_count(), self.world_size(), self.rank());
        check_gatherable(t)?;
        let size = t.dtype().size_in_bytes();
        let mut bytes = vec![0u8; n * world * size];
        tensor_bytes(t, &mut bytes[rank * n * size..(rank + 1) * n * size])?;
        self.all_gather(&mut bytes)?;
        tensor_from_bytes(&bytes, t.dtype(), n * world, t.device())
    }
}

/// An F32 tensor's values on the host, or an error naming the collective.
fn host_f32(t: &Tensor, op: &str) -> crate::Result<Vec<f32>> {
    if t.dtype() != DType::F32 {
        return Err(crate::Error::config(
            "collective",
            format!("{op} takes F32 tensors, not {:?}", t.dtype()),
        ));
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

pub(crate) fn check_gatherable(t: &Tensor) -> crate::Result<()> {
    if t.rank() != 1 || !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Err(crate::Error::config(
            "collective",
            format!(
                "all_gather_tensor takes a 1-D F32, BF16 or F16 tensor, not {:?} {:?}",
                t.dtype(),
                t.dims()
            ),
        ));
    }
    Ok(())
}

/// Writes a 1-D tensor's values into `out` as little-endian bytes.
fn tensor_bytes(t: &Tensor, out: &mut [u8]) -> crate::Result<()> {
    match t.dtype() {
        DType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(t.to_vec1::<f32>()?) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(t.to_vec1::<half::bf16>()?) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        _ => {
            for (o, v) in out.chunks_exact_mut(2).zip(t.to_vec1::<half::f16>()?) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// A 1-D tensor of `n` values of `dtype` read from little-endian bytes.
fn tensor_from_bytes(bytes: &[u8], dtype: DType, n: usize, device: &candle::Device) -> crate::Result<Tensor> {
    let t = match dtype {
        DType::F32 => {
            let v: Vec<f32> =
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            Tensor::from_vec(v, n, device)?
        }
        DType::BF16 => {
            let v: Vec<half::bf16> =
                bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])).collect();
            Tensor::from_vec(v, n, device)?
        }
        _ => {
            let v: Vec<half::f16> =
                bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect();
            Tensor::from_vec(v, n, device)?
        }
    };
    Ok(t)
}
