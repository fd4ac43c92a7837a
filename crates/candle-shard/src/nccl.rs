//! The NCCL backend (feature `nccl`): one process per GPU, collectives through NCCL on the
//! device's stream.
//!
//! [`NcclCommunicator`] implements the [`Communicator`] trait (host slices in, host slices out;
//! chunk `rank` is this rank's), with [`NcclError`] mapped into [`CommError`]
//! ([`CommError::BadLength`], [`CommError::BadRoot`], [`CommError::Backend`]).
//! [`NcclCommunicator::connect`] forms the group from the launcher's variables: rank 0 makes
//! the unique id ([`NcclId::new`]) and broadcasts its 128 bytes over the TCP rendezvous
//! ([`TcpCommunicator`]) at `MASTER_ADDR:MASTER_PORT`, then every rank joins the NCCL group.
//!
//! Buffers are staged through device memory on each call: that is what a host-slice API costs.
//! The ZeRO stages will want a device-buffer API beside it, so gradients never leave the GPU.
//! NCCL calls block with no timeout of their own: a missing peer hangs (NCCL's
//! `NCCL_TIMEOUT`/watchdog settings apply); [`Communicator::timeout`] is the rendezvous's.
//! Compiled in CI, never run yet (no GPU).

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use candle::cuda::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DeviceRepr, DriverError, ValidAsZeroBits,
};
use candle::cuda::cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use candle::cuda_backend::CudaDType;
use candle::{CudaDevice, CudaStorage, DType, Storage, Tensor};
use half::{bf16, f16};

use crate::comm::{CommStats, Communicator, Op, TcpCommunicator};
use crate::discovery::RankInfo;
use crate::error::CommError;

/// Why an NCCL operation failed.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NcclError {
    /// NCCL returned an error code.
    #[error("nccl {op} on rank {rank} failed: {code}")]
    Nccl {
        /// The operation.
        op: &'static str,
        /// The rank reporting it.
        rank: usize,
        /// NCCL's result code.
        code: String,
    },
    /// A CUDA call around the collective (staging copies, synchronisation) failed.
    #[error("cuda error in nccl {op} on rank {rank}: {message}")]
    Cuda {
        /// The operation.
        op: &'static str,
        /// The rank reporting it.
        rank: usize,
        /// The driver's message.
        message: String,
    },
    /// A buffer that does not split into `world_size` equal chunks.
    #[error("{op} on rank {rank}: a buffer of {len} elements cannot be split over {world_size} ranks")]
    BadLength {
        /// The operation.
        op: &'static str,
        /// The rank reporting it.
        rank: usize,
        /// The buffer's length.
        len: usize,
        /// The group's size.
        world_size: usize,
    },
    /// A root or rank outside the group.
    #[error("{op}: rank {rank} is outside a group of {world_size}")]
    BadRank {
        /// The operation.
        op: &'static str,
        /// The offending rank.
        rank: usize,
        /// The group's size.
        world_size: usize,
    },
    /// Bytes that are not a 128-byte NCCL unique id.
    #[error("an nccl unique id is 128 bytes, got {0}")]
    BadId(usize),
}

/// The unique id every rank of one NCCL group starts from: rank 0 makes it, the others
/// receive its bytes (over the rendezvous).
#[derive(Clone, Copy)]
pub struct NcclId(Id);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (NCCL picks the network interface and port rank 0 will listen on).
    ///
    /// # Errors
    /// [`NcclError::Nccl`] when NCCL cannot create one (no usable network interface).
    pub fn new() -> Result<Self, NcclError> {
        Id::new().map(Self).map_err(|e| NcclError::Nccl {
            op: "get_unique_id",
            rank: 0,
            code: format!("{e:?}"),
        })
    }

    /// The id's 128 bytes, to send to the other ranks.
    pub fn as_bytes(&self) -> [u8; 128] {
        self.0.internal().map(|c| c as u8)
    }

    /// The id from the bytes rank 0 sent.
    ///
    /// # Errors
    /// [`NcclError::BadId`] unless there are exactly 128 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, NcclError> {
        let bytes: [u8; 128] = bytes.try_into().map_err(|_| NcclError::BadId(bytes.len()))?;
        Ok(Self(Id::uninit(bytes.map(|b| b as std::ffi::c_char))))
    }
}

/// One rank of an NCCL group on one CUDA device.
pub struct NcclCommunicator {
    comm: SendComm,
    stream: Arc<CudaStream>,
    timeout: Duration,
    stats: Cell<CommStats>,
    /// Bytes copied host -> device -> host to stage collectives.
    staged: Cell<u64>,
}

/// cudarc's `Comm` holds NCCL's raw communicator handle, so it is not `Send`.
struct SendComm(Comm);

// SAFETY: an NCCL communicator may be used from any host thread as long as no two calls on it
// overlap (NCCL's thread-safety rule). `NcclCommunicator` is `Send` but not `Sync`, so only the
// one thread that owns it can call it at a time.
unsafe impl Send for SendComm {}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .finish()
    }
}

impl NcclCommunicator {
    /// Joins the group of `world_size` ranks started from `id`, as `rank`, on `device`'s stream.
    /// Blocks until every rank has joined.
    ///
    /// # Errors
    /// [`NcclError::BadRank`] for `rank >= world_size`; [`NcclError::Nccl`] when NCCL cannot
    /// form the group (two ranks on one GPU, an unreachable rank 0).
    pub fn new(device: &CudaDevice, rank: usize, world_size: usize, id: &NcclId) -> Result<Self, NcclError> {
        if rank >= world_size {
            return Err(NcclError::BadRank { op: "init", rank, world_size });
        }
        let stream = device.cuda_stream();
        let comm = Comm::from_rank(stream.clone(), rank, world_size, id.0).map_err(|e| NcclError::Nccl {
            op: "init",
            rank,
            code: format!("{e:?}"),
        })?;
        Ok(Self {
            comm: SendComm(comm),
            stream,
            timeout: Duration::from_secs(300),
            stats: Cell::default(),
            staged: Cell::new(0),
        })
    }

    /// Joins the NCCL group of the launcher's ranks (`info`: from torchrun, Slurm or
    /// `candle-fit launch`) on `device`: the ranks meet over TCP at `MASTER_ADDR:MASTER_PORT`
    /// (waiting at most `timeout`), rank 0 broadcasts a fresh unique id, and every rank joins.
    ///
    /// # Errors
    /// A rendezvous failure (a rank that never arrives: [`CommError::Timeout`]), or as
    /// [`Self::new`].
    pub fn connect(info: &RankInfo, device: &CudaDevice, timeout: Duration) -> crate::Result<Self> {
        let rendezvous = TcpCommunicator::connect(info, timeout)?;
        let mut bytes = [0u8; 128];
        if info.rank == 0 {
            bytes = NcclId::new().map_err(|e| backend(Op::Broadcast, 0, e))?.as_bytes();
        }
        rendezvous.broadcast(&mut bytes, 0)?;
        let id = NcclId::from_bytes(&bytes).map_err(|e| backend(Op::Broadcast, info.rank, e))?;
        let mut comm = Self::new(device, info.rank, info.world_size, &id)
            .map_err(|e| backend(Op::Barrier, info.rank, e))?;
        comm.timeout = timeout;
        Ok(comm)
    }

    /// A group of one on `device`: every collective is the identity, which is how the ZeRO
    /// stages run over NCCL on a one-GPU machine.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn single(device: &CudaDevice) -> Result<Self, NcclError> {
        Self::new(device, 0, 1, &NcclId::new()?)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.0.rank()
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.comm.0.world_size()
    }

    fn cuda(&self, op: &'static str) -> impl Fn(DriverError) -> NcclError {
        let rank = self.rank();
        move |e| NcclError::Cuda { op, rank, message: e.to_string() }
    }

    fn nccl<T: std::fmt::Debug>(&self, op: &'static str) -> impl Fn(T) -> NcclError {
        let rank = self.rank();
        move |e| NcclError::Nccl { op, rank, code: format!("{e:?}") }
    }

    fn chunk(&self, op: &'static str, len: usize) -> Result<usize, NcclError> {
        let world_size = self.world_size();
        if len % world_size != 0 {
            return Err(NcclError::BadLength { op, rank: self.rank(), len, world_size });
        }
        Ok(len / world_size)
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<i32, NcclError> {
        let world_size = self.world_size();
        match i32::try_from(root) {
            Ok(r) if root < world_size => Ok(r),
            _ => Err(NcclError::BadRank { op, rank: root, world_size }),
        }
    }

    /// Copies `values` to the device, runs `collective` on the copy in place, and copies it
    /// back, waiting for the stream.
    fn in_place<T, E>(
        &self,
        op: &'static str,
        values: &mut [T],
        collective: impl FnOnce(&Comm, &mut candle::cuda::cudarc::driver::CudaSlice<T>) -> Result<(), E>,
    ) -> Result<(), NcclError>
    where
        T: DeviceRepr + ValidAsZeroBits + NcclType,
        E: std::fmt::Debug,
    {
        if values.is_empty() {
            return Ok(());
        }
        self.staged.set(self.staged.get() + 2 * std::mem::size_of_val(values) as u64);
        let mut buffer = self.stream.clone_htod(&*values).map_err(self.cuda(op))?;
        collective(&self.comm.0, &mut buffer).map_err(self.nccl(op))?;
        self.stream.memcpy_dtoh(&buffer, values).map_err(self.cuda(op))?;
        self.stream.synchronize().map_err(self.cuda(op))
    }

    /// Replaces `values` on every rank by their sum over ranks.
    ///
    /// # Errors
    /// An NCCL or CUDA failure.
    pub fn all_reduce_f32(&self, values: &mut [f32]) -> Result<(), NcclError> {
        self.in_place("all_reduce", values, |comm, b| comm.all_reduce_in_place(b, &ReduceOp::Sum).map(drop))
    }

    /// As [`Self::all_reduce_f32`], in FP64.
    ///
    /// # Errors
    /// As [`Self::all_reduce_f32`].
    pub fn all_reduce_f64(&self, values: &mut [f64]) -> Result<(), NcclError> {
        self.in_place("all_reduce", values, |comm, b| comm.all_reduce_in_place(b, &ReduceOp::Sum).map(drop))
    }

    /// Replaces the root's `values` by the sum over ranks; other ranks' are left unspecified.
    ///
    /// # Errors
    /// [`NcclError::BadRank`] for a root outside the group, or an NCCL or CUDA failure.
    pub fn reduce_f32(&self, values: &mut [f32], root: usize) -> Result<(), NcclError> {
        let root = self.check_root("reduce", root)?;
        self.in_place("reduce", values, |comm, b| comm.reduce_in_place(b, &ReduceOp::Sum, root).map(drop))
    }

    /// `values` is cut into `world_size` chunks; on return chunk `rank` holds the sum over
    /// ranks of their chunk `rank`; the other chunks are left unchanged.
    ///
    /// # Errors
    /// [`NcclError::BadLength`] when the length does not split evenly, or an NCCL or CUDA failure.
    pub fn reduce_scatter_f32(&self, values: &mut [f32]) -> Result<(), NcclError> {
        const OP: &str = "reduce_scatter";
        let chunk = self.chunk(OP, values.len())?;
        if chunk == 0 {
            return Ok(());
        }
        self.staged.set(self.staged.get() + 4 * (values.len() + chunk) as u64);
        let send = self.stream.clone_htod(&*values).map_err(self.cuda(OP))?;
        let mut receive = self.stream.alloc_zeros::<f32>(chunk).map_err(self.cuda(OP))?;
        self.comm.0.reduce_scatter(&send, &mut receive, &ReduceOp::Sum).map_err(self.nccl(OP))?;
        let mine = &mut values[self.rank() * chunk..(self.rank() + 1) * chunk];
        self.stream.memcpy_dtoh(&receive, mine).map_err(self.cuda(OP))?;
        self.stream.synchronize().map_err(self.cuda(OP))
    }

    /// `bytes` is cut into `world_size` chunks; each rank supplies chunk `rank`, and on return
    /// every chunk holds its owner's bytes.
    ///
    /// # Errors
    /// As [`Self::reduce_scatter_f32`].
    pub fn all_gather(&self, bytes: &mut [u8]) -> Result<(), NcclError> {
        const OP: &str = "all_gather";
        let chunk = self.chunk(OP, bytes.len())?;
        if chunk == 0 {
            return Ok(());
        }
        let mine = &bytes[self.rank() * chunk..(self.rank() + 1) * chunk];
        self.staged.set(self.staged.get() + (mine.len() + bytes.len()) as u64);
        let send = self.stream.clone_htod(mine).map_err(self.cuda(OP))?;
        let mut receive = self.stream.alloc_zeros::<u8>(bytes.len()).map_err(self.cuda(OP))?;
        self.comm.0.all_gather(&send, &mut receive).map_err(self.nccl(OP))?;
        self.stream.memcpy_dtoh(&receive, bytes).map_err(self.cuda(OP))?;
        self.stream.synchronize().map_err(self.cuda(OP))
    }

    /// Replaces `bytes` by the root's.
    ///
    /// # Errors
    /// As [`Self::reduce_f32`].
    pub fn broadcast(&self, bytes: &mut [u8], root: usize) -> Result<(), NcclError> {
        let root = self.check_root("broadcast", root)?;
        self.in_place("broadcast", bytes, |comm, b| comm.broadcast_in_place(b, root).map(drop))
    }

    /// Returns when every rank has called it (an all-reduce of one value).
    ///
    /// # Errors
    /// An NCCL or CUDA failure.
    pub fn barrier(&self) -> Result<(), NcclError> {
        self.in_place("barrier", &mut [0f32], |comm, b| comm.all_reduce_in_place(b, &ReduceOp::Sum).map(drop))
    }
}

fn backend(op: Op, rank: usize, e: NcclError) -> CommError {
    CommError::Backend { op, rank, message: e.to_string() }
}

impl NcclCommunicator {
    /// Maps an [`NcclError`] of `op` into the trait's [`CommError`] and counts the call.
    fn traced(&self, op: Op, bytes: usize, result: Result<(), NcclError>) -> Result<(), CommError> {
        let rank = self.rank();
        let world_size = self.world_size();
        match result {
            Ok(()) => {
                let mut stats = self.stats.get();
                stats.record(op, bytes, world_size);
                self.stats.set(stats);
                Ok(())
            }
            Err(NcclError::BadLength { len, .. }) => Err(CommError::BadLength { op, rank, len, world_size }),
            Err(NcclError::BadRank { rank: root, .. }) => {
                Err(CommError::BadRoot { op, rank, root, world_size })
            }
            Err(e) => Err(backend(op, rank, e)),
        }
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        NcclCommunicator::rank(self)
    }

    fn world_size(&self) -> usize {
        NcclCommunicator::world_size(self)
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce_f32(&self, values: &mut [f32]) -> Result<(), CommError> {
        let bytes = std::mem::size_of_val(values);
        self.traced(Op::AllReduce, bytes, NcclCommunicator::all_reduce_f32(self, values))
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<(), CommError> {
        let bytes = std::mem::size_of_val(values);
        self.traced(Op::AllReduce, bytes, NcclCommunicator::all_reduce_f64(self, values))
    }

    fn reduce_f32(&self, values: &mut [f32], root: usize) -> Result<(), CommError> {
        let bytes = std::mem::size_of_val(values);
        self.traced(Op::Reduce, bytes, NcclCommunicator::reduce_f32(self, values, root))
    }

    fn reduce_scatter_f32(&self, values: &mut [f32]) -> Result<(), CommError> {
        let bytes = std::mem::size_of_val(values);
        self.traced(Op::ReduceScatter, bytes, NcclCommunicator::reduce_scatter_f32(self, values))
    }

    fn all_gather(&self, bytes: &mut [u8]) -> Result<(), CommError> {
        let len = bytes.len();
        self.traced(Op::AllGather, len, NcclCommunicator::all_gather(self, bytes))
    }

    fn broadcast(&self, bytes: &mut [u8], root: usize) -> Result<(), CommError> {
        let len = bytes.len();
        self.traced(Op::Broadcast, len, NcclCommunicator::broadcast(self, bytes, root))
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.traced(Op::Barrier, 0, NcclCommunicator::barrier(self))
    }

    fn stats(&self) -> CommStats {
        self.stats.get()
    }

    fn host_staged_bytes(&self) -> u64 {
        self.staged.get()
    }

    /// On device memory: no host staging.
    fn all_reduce_tensor(&self, t: &Tensor) -> crate::Result<Tensor> {
        let t = cuda_input(t, "all_reduce_tensor", DType::F32)?;
        let n = t.elem_count();
        let out = self.on_device(Op::AllReduce, 4 * n, |comm, stream| {
            let (storage, layout) = t.storage_and_layout();
            let send = view::<f32>(&storage, layout)?;
            let mut receive = stream.alloc_zeros::<f32>(n).map_err(|e| device_error(&e))?;
            comm.all_reduce(&send, &mut receive, &ReduceOp::Sum).map_err(|e| format!("{e:?}"))?;
            Ok(receive)
        })?;
        Ok(wrap(out, &t)?.reshape(t.shape())?)
    }

    fn reduce_scatter_tensor(&self, t: &Tensor) -> crate::Result<Tensor> {
        let t = cuda_input(t, "reduce_scatter_tensor", DType::F32)?;
        let chunk = match self.chunk("reduce_scatter", t.elem_count()) {
            Ok(chunk) => chunk,
            Err(e) => {
                return Err(self.traced(Op::ReduceScatter, 0, Err(e)).err().map_or_else(
                    || crate::Error::config("collective", "reduce_scatter_tensor: bad length"),
                    crate::Error::from,
                ))
            }
        };
        let out = self.on_device(Op::ReduceScatter, 4 * t.elem_count(), |comm, stream| {
            let (storage, layout) = t.storage_and_layout();
            let send = view::<f32>(&storage, layout)?;
            let mut receive = stream.alloc_zeros::<f32>(chunk).map_err(|e| device_error(&e))?;
            comm.reduce_scatter(&send, &mut receive, &ReduceOp::Sum).map_err(|e| format!("{e:?}"))?;
            Ok(receive)
        })?;
        wrap(out, &t)
    }

    fn all_gather_tensor(&self, t: &Tensor) -> crate::Result<Tensor> {
        crate::comm::check_gatherable(t)?;
        let t = cuda_input(t, "all_gather_tensor", t.dtype())?;
        let total = t.elem_count() * self.world_size();
        let bytes = total * t.dtype().size_in_bytes();
        fn gather<T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits>(
            comm: &Comm,
            stream: &Arc<CudaStream>,
            t: &Tensor,
            total: usize,
        ) -> Result<CudaSlice<T>, String> {
            let (storage, layout) = t.storage_and_layout();
            let send = view::<T>(&storage, layout)?;
            let mut receive = stream.alloc_zeros::<T>(total).map_err(|e| device_error(&e))?;
            comm.all_gather(&send, &mut receive).map_err(|e| format!("{e:?}"))?;
            Ok(receive)
        }
        match t.dtype() {
            DType::F32 => {
                wrap(self.on_device(Op::AllGather, bytes, |c, s| gather::<f32>(c, s, &t, total))?, &t)
            }
            DType::BF16 => {
                wrap(self.on_device(Op::AllGather, bytes, |c, s| gather::<bf16>(c, s, &t, total))?, &t)
            }
            _ => wrap(self.on_device(Op::AllGather, bytes, |c, s| gather::<f16>(c, s, &t, total))?, &t),
        }
    }
}

/// A contiguous copy (or the tensor itself) of a CUDA tensor of `dtype`, or an error naming
/// the collective.
fn cuda_input(t: &Tensor, op: &str, dtype: DType) -> crate::Result<Tensor> {
    if !t.device().is_cuda() || t.dtype() != dtype {
        return Err(crate::Error::config(
            "collective",
            format!(
                "the NCCL backend's {op} takes a {dtype:?} CUDA tensor, not {:?} on {:?}",
                t.dtype(),
                t.device().location()
            ),
        ));
    }
    Ok(t.contiguous()?)
}

fn device_error(e: &DriverError) -> String {
    format!("{e:?}")
}

/// A contiguous CUDA tensor's elements as a typed view.
fn view<'a, T: CudaDType>(storage: &'a Storage, layout: &candle::Layout) -> Result<CudaView<'a, T>, String> {
    let (start, end) = layout.contiguous_offsets().ok_or("a non-contiguous tensor")?;
    match storage {
        Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>().map_err(|e| e.to_string())?.slice(start..end)),
        _ => Err("a tensor off CUDA".to_string()),
    }
}

/// A new 1-D tensor owning `slice`, on `like`'s device.
fn wrap<T: CudaDType>(slice: CudaSlice<T>, like: &Tensor) -> crate::Result<Tensor> {
    let candle::Device::Cuda(device) = like.device() else {
        return Err(crate::Error::config("collective", "the NCCL backend's result must live on CUDA"));
    };
    let n = slice.len();
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, device.clone()));
    Ok(Tensor::from_storage(storage, n, candle::op::BackpropOp::none(), false))
}

impl NcclCommunicator {
    /// Runs a collective on device buffers, recorded in the statistics like the slice ones.
    fn on_device<T>(
        &self,
        op: Op,
        bytes: usize,
        run: impl FnOnce(&Comm, &Arc<CudaStream>) -> Result<T, String>,
    ) -> crate::Result<T> {
        let outcome = run(&self.comm.0, &self.stream);
        let status = match &outcome {
            Ok(_) => Ok(()),
            Err(message) => Err(NcclError::Nccl { op: op.name(), rank: self.rank(), code: message.clone() }),
        };
        self.traced(op, bytes, status)?;
        outcome.map_err(|message| crate::Error::config("collective", message))
    }
}
