//! A multi-process backend over TCP for CPU runs: rank 0 listens at `MASTER_ADDR:MASTER_PORT`
//! (the torchrun/Slurm rendezvous, see [`crate::discovery`]), every other rank connects to it,
//! and each collective goes through rank 0 (a star: every rank sends its contribution to rank
//! 0, which computes in rank order, exactly as the in-process backend does, and sends each rank
//! its result). Simple and bit-identical to [`LocalGroup`](super::LocalGroup); not bandwidth
//! optimal (rank 0 moves N times the buffer), which is fine on one machine and for tests.
//! `CommStats` still counts the ring convention, so numbers compare across backends.
//!
//! Every socket read and write is bounded by the timeout; a peer that closes its connection
//! (its process failed or finished) is reported as [`CommError::PeerLeft`].

use std::cell::{Cell, RefCell};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{CommStats, Communicator, Op};
use crate::discovery::RankInfo;
use crate::error::{CommError, Error, Result};

const MAGIC: u32 = 0x6366_7a72; // "cfzr"
/// The wire protocol's version, exchanged in the handshake: ranks of different builds refuse
/// each other instead of misreading messages.
const PROTOCOL_VERSION: u32 = 2;
/// Handshake: `[MAGIC, PROTOCOL_VERSION, rank, world_size]` from a peer, the same with rank 0
/// back from the hub, each a little-endian u32.
const HELLO_BYTES: usize = 16;

fn hello(rank: usize, world_size: usize) -> [u8; HELLO_BYTES] {
    let mut out = [0u8; HELLO_BYTES];
    for (i, word) in [MAGIC, PROTOCOL_VERSION, rank as u32, world_size as u32].into_iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&word.to_le_bytes());
    }
    out
}

/// `(magic, version, rank, world size)` of a handshake.
fn parse_hello(bytes: &[u8; HELLO_BYTES]) -> (u32, u32, usize, usize) {
    let word =
        |i: usize| u32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
    (word(0), word(1), word(2) as usize, word(3) as usize)
}

/// One rank's connection(s): rank 0 holds one stream per peer, the others one to rank 0.
enum Links {
    Hub(Vec<TcpStream>),
    Spoke(TcpStream),
}

/// One rank of a TCP group (one process per rank).
pub struct TcpCommunicator {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    links: RefCell<Links>,
    stats: Cell<CommStats>,
    failure: RefCell<Option<CommError>>,
}

impl std::fmt::Debug for TcpCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

/// What every message starts with: the call, so that ranks calling different things fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    op: u8,
    kind: u8,
    root: u32,
    len: u64,
}

impl Header {
    fn encode(&self) -> [u8; 14] {
        let mut out = [0u8; 14];
        out[0] = self.op;
        out[1] = self.kind;
        out[2..6].copy_from_slice(&self.root.to_le_bytes());
        out[6..14].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; 14]) -> Self {
        let mut root = [0u8; 4];
        root.copy_from_slice(&bytes[2..6]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[6..14]);
        Self { op: bytes[0], kind: bytes[1], root: u32::from_le_bytes(root), len: u64::from_le_bytes(len) }
    }
}

fn op_of(code: u8) -> Op {
    Op::ALL.get(code as usize).copied().unwrap_or(Op::Barrier)
}

impl TcpCommunicator {
    /// Joins the group `info` describes: rank 0 listens on `master_addr:master_port` and waits
    /// for the others; the others connect, retrying until `timeout` (rank 0 may start later).
    ///
    /// # Errors
    /// [`Error::Comm`] with a [`CommError::Timeout`] when the group is not complete within
    /// `timeout`; [`Error::InvalidConfig`] when the address does not resolve or a peer
    /// announces another world size or a duplicate rank.
    pub fn connect(info: &RankInfo, timeout: Duration) -> Result<Self> {
        let (rank, world_size) = (info.rank, info.world_size);
        let address = format!("{}:{}", info.master_addr, info.master_port);
        let deadline = Instant::now() + timeout;
        let timed_out =
            |missing: Vec<usize>| Error::Comm(CommError::Timeout { op: Op::Barrier, rank, timeout, missing });
        let links = if rank == 0 {
            let listener = TcpListener::bind(&address)
                .map_err(|e| Error::config("MASTER_ADDR", format!("cannot listen on {address}: {e}")))?;
            listener.set_nonblocking(true).map_err(|e| Error::config("MASTER_ADDR", e.to_string()))?;
            let mut peers: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream
                            .set_nonblocking(false)
                            .map_err(|e| Error::config("MASTER_ADDR", e.to_string()))?;
                        let mut stream = configure(stream, timeout)?;
                        let mut theirs = [0u8; HELLO_BYTES];
                        if stream.read_exact(&mut theirs).is_err() {
                            continue;
                        }
                        let (magic, version, peer, peer_world) = parse_hello(&theirs);
                        if magic != MAGIC {
                            // Not a candle-fit rank (a port scanner, a stale client): ignore it.
                            continue;
                        }
                        if version != PROTOCOL_VERSION {
                            return Err(Error::config(
                                "MASTER_PORT",
                                format!("rank {peer} speaks protocol version {version}, this rank {PROTOCOL_VERSION}: mixed candle-fit builds"),
                            ));
                        }
                        if peer_world != world_size
                            || peer == 0
                            || peer >= world_size
                            || peers[peer - 1].is_some()
                        {
                            return Err(Error::config(
                                "WORLD_SIZE",
                                format!("rank {peer} joined with world size {peer_world}, expected {world_size} and a new rank"),
                            ));
                        }
                        if stream.write_all(&hello(0, world_size)).is_err() {
                            continue;
                        }
                        peers[peer - 1] = Some(stream);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            let missing = (1..world_size).filter(|&r| peers[r - 1].is_none()).collect();
                            return Err(timed_out(missing));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(Error::config("MASTER_PORT", format!("accept failed: {e}"))),
                }
            }
            Links::Hub(peers.into_iter().flatten().collect())
        } else {
            let target = address
                .to_socket_addrs()
                .map_err(|e| Error::config("MASTER_ADDR", format!("`{address}` does not resolve: {e}")))?
                .next()
                .ok_or_else(|| Error::config("MASTER_ADDR", format!("`{address}` does not resolve")))?;
            let stream = loop {
                match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => return Err(timed_out(vec![0])),
                }
            };
            let mut stream = configure(stream, timeout)?;
            stream.write_all(&hello(rank, world_size)).map_err(|_| timed_out(vec![0]))?;
            // Rank 0 answers with its own handshake: anything else at that address (another
            // program, another build) is refused here, before any length is read from it.
            let mut answer = [0u8; HELLO_BYTES];
            stream.read_exact(&mut answer).map_err(|e| {
                Error::config(
                    "MASTER_ADDR",
                    format!("{address} did not answer as a candle-fit rank 0 ({e}): is another program listening there?"),
                )
            })?;
            match parse_hello(&answer) {
                (MAGIC, PROTOCOL_VERSION, 0, w) if w == world_size => {}
                (MAGIC, PROTOCOL_VERSION, r, w) => {
                    return Err(Error::config(
                        "WORLD_SIZE",
                        format!("{address} answered as rank {r} of {w}, expected rank 0 of {world_size}"),
                    ))
                }
                (MAGIC, v, _, _) => {
                    return Err(Error::config(
                        "MASTER_PORT",
                        format!("{address} speaks protocol version {v}, this rank {PROTOCOL_VERSION}: mixed candle-fit builds"),
                    ))
                }
                _ => {
                    return Err(Error::config(
                        "MASTER_ADDR",
                        format!("{address} is not a candle-fit rank 0 (wrong handshake): is another program listening there?"),
                    ))
                }
            }
            Links::Spoke(stream)
        };
        Ok(Self {
            rank,
            world_size,
            timeout,
            links: RefCell::new(links),
            stats: Cell::new(CommStats::default()),
            failure: RefCell::new(None),
        })
    }

    fn io_error(&self, op: Op, peer: usize, e: &std::io::Error) -> CommError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                CommError::Timeout { op, rank: self.rank, timeout: self.timeout, missing: vec![peer] }
            }
            _ => CommError::PeerLeft { op, rank: self.rank, peer },
        }
    }

    /// Runs one collective: `contribution` is what this rank sends to rank 0 (if anything);
    /// `compute` runs on rank 0 over every rank's contribution in rank order and returns what
    /// each rank receives (rank 0's own included); the return value is this rank's.
    fn run(
        &self,
        header: Header,
        contribution: Option<&[u8]>,
        receives: bool,
        compute: impl FnOnce(Vec<Option<Vec<u8>>>) -> Vec<Option<Vec<u8>>>,
    ) -> std::result::Result<Option<Vec<u8>>, CommError> {
        let op = op_of(header.op);
        if let Some(cause) = self.failure.borrow().as_ref() {
            return Err(CommError::Aborted { op, rank: self.rank, cause: Box::new(cause.clone()) });
        }
        let result = self.exchange(header, contribution, receives, compute);
        if let Err(e) = &result {
            *self.failure.borrow_mut() = Some(e.clone());
        }
        result
    }

    fn exchange(
        &self,
        header: Header,
        contribution: Option<&[u8]>,
        receives: bool,
        compute: impl FnOnce(Vec<Option<Vec<u8>>>) -> Vec<Option<Vec<u8>>>,
    ) -> std::result::Result<Option<Vec<u8>>, CommError> {
        let op = op_of(header.op);
        let mut links = self.links.borrow_mut();
        match &mut *links {
            Links::Spoke(hub) => {
                let mut message = header.encode().to_vec();
                if let Some(bytes) = contribution {
                    message.extend_from_slice(bytes);
                }
                hub.write_all(&message).map_err(|e| self.io_error(op, 0, &e))?;
                if !receives {
                    // Wait for the hub's acknowledgement so every call is a synchronization.
                    let mut ack = [0u8; 1];
                    hub.read_exact(&mut ack).map_err(|e| self.io_error(op, 0, &e))?;
                    return Ok(None);
                }
                let mut len = [0u8; 8];
                hub.read_exact(&mut len).map_err(|e| self.io_error(op, 0, &e))?;
                // No result is longer than the call's whole buffer: a larger length is a broken
                // stream, refused before allocating it.
                let len = u64::from_le_bytes(len);
                let bound = header.len.saturating_mul(element_bytes(header.kind));
                if len > bound {
                    return Err(CommError::Backend {
                        op,
                        rank: self.rank,
                        message: format!(
                            "rank 0 announced a result of {len} bytes, more than the {bound} of this call"
                        ),
                    });
                }
                let mut out = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
                hub.read_exact(&mut out).map_err(|e| self.io_error(op, 0, &e))?;
                Ok(Some(out))
            }
            Links::Hub(peers) => {
                let mut contributions = vec![contribution.map(<[u8]>::to_vec)];
                for (i, peer) in peers.iter_mut().enumerate() {
                    let rank = i + 1;
                    let mut raw = [0u8; 14];
                    peer.read_exact(&mut raw).map_err(|e| self.io_error(op, rank, &e))?;
                    let theirs = Header::decode(&raw);
                    if theirs != header {
                        return Err(CommError::Mismatch {
                            op,
                            rank: self.rank,
                            len: header.len as usize,
                            peer: rank,
                            peer_op: op_of(theirs.op),
                            peer_len: theirs.len as usize,
                        });
                    }
                    let expected = expected_contribution(header, rank, self.world_size);
                    let received = if expected > 0 {
                        let mut bytes = vec![0u8; expected];
                        peer.read_exact(&mut bytes).map_err(|e| self.io_error(op, rank, &e))?;
                        Some(bytes)
                    } else {
                        None
                    };
                    contributions.push(received);
                }
                let mut results = compute(contributions).into_iter();
                let mine = results.next().flatten();
                for (i, (peer, result)) in peers.iter_mut().zip(results).enumerate() {
                    let rank = i + 1;
                    let message = match result {
                        Some(bytes) => {
                            let mut m = (bytes.len() as u64).to_le_bytes().to_vec();
                            m.extend_from_slice(&bytes);
                            m
                        }
                        None => vec![1u8],
                    };
                    peer.write_all(&message).map_err(|e| self.io_error(op, rank, &e))?;
                }
                Ok(mine)
            }
        }
    }

    fn record(&self, op: Op, bytes: usize) {
        let mut stats = self.stats.get();
        stats.record(op, bytes, self.world_size);
        self.stats.set(stats);
    }

    fn check_split(&self, op: Op, len: usize) -> std::result::Result<usize, CommError> {
        if len % self.world_size != 0 {
            return Err(CommError::BadLength { op, rank: self.rank, len, world_size: self.world_size });
        }
        Ok(len / self.world_size)
    }

    /// Copies a result received from rank 0 into `dst`, refusing one of the wrong length.
    fn fill(&self, op: Op, dst: &mut [u8], src: &[u8]) -> std::result::Result<(), CommError> {
        if dst.len() != src.len() {
            return Err(CommError::Mismatch {
                op,
                rank: self.rank,
                len: dst.len(),
                peer: 0,
                peer_op: op,
                peer_len: src.len(),
            });
        }
        dst.copy_from_slice(src);
        Ok(())
    }

    fn check_root(&self, op: Op, root: usize) -> std::result::Result<(), CommError> {
        if root >= self.world_size {
            return Err(CommError::BadRoot { op, rank: self.rank, root, world_size: self.world_size });
        }
        Ok(())
    }
}

fn configure(stream: TcpStream, timeout: Duration) -> Result<TcpStream> {
    let io = |e: std::io::Error| Error::config("MASTER_ADDR", format!("socket setup failed: {e}"));
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    Ok(stream)
}

/// Bytes per element of a call's `kind`.
fn element_bytes(kind: u8) -> u64 {
    match kind {
        KIND_F32 => 4,
        KIND_F64 => 8,
        _ => 1,
    }
}

/// Bytes rank `rank` sends to the hub for a call described by `header`.
fn expected_contribution(header: Header, rank: usize, world_size: usize) -> usize {
    let len = header.len as usize;
    let element = element_bytes(header.kind) as usize;
    match op_of(header.op) {
        Op::AllReduce | Op::Reduce | Op::ReduceScatter => len * element,
        Op::AllGather => len / world_size,
        Op::Broadcast if header.root as usize == rank => len,
        Op::Broadcast | Op::Barrier => 0,
    }
}

const KIND_F32: u8 = 1;
const KIND_F64: u8 = 2;
const KIND_BYTES: u8 = 3;

fn header(op: Op, kind: u8, root: usize, len: usize) -> Header {
    let code = Op::ALL.iter().position(|&o| o == op).unwrap_or(0) as u8;
    Header { op: code, kind, root: root as u32, len: len as u64 }
}

/// Sums per-rank little-endian buffers of `T` in rank order (starting from zero, as the
/// in-process backend does) into one buffer of bytes.
fn sum_in_rank_order<T: bytemuck::Pod + Default + std::ops::AddAssign>(
    parts: &[Option<Vec<u8>>],
    len: usize,
) -> Vec<u8> {
    let mut sum = vec![T::default(); len];
    for part in parts.iter().flatten() {
        let mut values = vec![T::default(); len];
        bytemuck::cast_slice_mut::<T, u8>(&mut values).copy_from_slice(part);
        sum.iter_mut().zip(values).for_each(|(s, v)| *s += v);
    }
    bytemuck::cast_slice(&sum).to_vec()
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn all_reduce_f32(&self, values: &mut [f32]) -> std::result::Result<(), CommError> {
        let (n, len) = (self.world_size, values.len());
        let out = self.run(
            header(Op::AllReduce, KIND_F32, 0, len),
            Some(bytemuck::cast_slice(values)),
            true,
            |parts| {
                let sum = sum_in_rank_order::<f32>(&parts, len);
                vec![Some(sum); n]
            },
        )?;
        if let Some(bytes) = out {
            self.fill(Op::AllReduce, bytemuck::cast_slice_mut::<f32, u8>(values), &bytes)?;
        }
        self.record(Op::AllReduce, len * 4);
        Ok(())
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> std::result::Result<(), CommError> {
        let (n, len) = (self.world_size, values.len());
        let out = self.run(
            header(Op::AllReduce, KIND_F64, 0, len),
            Some(bytemuck::cast_slice(values)),
            true,
            |parts| {
                let sum = sum_in_rank_order::<f64>(&parts, len);
                vec![Some(sum); n]
            },
        )?;
        if let Some(bytes) = out {
            self.fill(Op::AllReduce, bytemuck::cast_slice_mut::<f64, u8>(values), &bytes)?;
        }
        self.record(Op::AllReduce, len * 8);
        Ok(())
    }

    fn reduce_f32(&self, values: &mut [f32], root: usize) -> std::result::Result<(), CommError> {
        self.check_root(Op::Reduce, root)?;
        let (n, len) = (self.world_size, values.len());
        let out = self.run(
            header(Op::Reduce, KIND_F32, root, len),
            Some(bytemuck::cast_slice(values)),
            self.rank == root,
            |parts| {
                let sum = sum_in_rank_order::<f32>(&parts, len);
                (0..n).map(|r| (r == root).then(|| sum.clone())).collect()
            },
        )?;
        if let Some(bytes) = out {
            self.fill(Op::Reduce, bytemuck::cast_slice_mut::<f32, u8>(values), &bytes)?;
        }
        self.record(Op::Reduce, len * 4);
        Ok(())
    }

    fn reduce_scatter_f32(&self, values: &mut [f32]) -> std::result::Result<(), CommError> {
        let chunk = self.check_split(Op::ReduceScatter, values.len())?;
        let (n, len) = (self.world_size, values.len());
        let out = self.run(
            header(Op::ReduceScatter, KIND_F32, 0, len),
            Some(bytemuck::cast_slice(values)),
            true,
            |parts| {
                let sum = sum_in_rank_order::<f32>(&parts, len);
                (0..n).map(|r| Some(sum[r * chunk * 4..(r + 1) * chunk * 4].to_vec())).collect()
            },
        )?;
        if let Some(bytes) = out {
            let mine = self.rank * chunk..(self.rank + 1) * chunk;
            self.fill(Op::ReduceScatter, bytemuck::cast_slice_mut::<f32, u8>(&mut values[mine]), &bytes)?;
        }
        self.record(Op::ReduceScatter, len * 4);
        Ok(())
    }

    fn all_gather(&self, values: &mut [u8]) -> std::result::Result<(), CommError> {
        let chunk = self.check_split(Op::AllGather, values.len())?;
        let (n, len) = (self.world_size, values.len());
        let mine = self.rank * chunk..(self.rank + 1) * chunk;
        let out =
            self.run(header(Op::AllGather, KIND_BYTES, 0, len), Some(&values[mine]), true, |parts| {
                let whole: Vec<u8> = parts.into_iter().flat_map(Option::unwrap_or_default).collect();
                vec![Some(whole); n]
            })?;
        if let Some(bytes) = out {
            self.fill(Op::AllGather, values, &bytes)?;
        }
        self.record(Op::AllGather, len);
        Ok(())
    }

    fn broadcast(&self, values: &mut [u8], root: usize) -> std::result::Result<(), CommError> {
        self.check_root(Op::Broadcast, root)?;
        let (n, len) = (self.world_size, values.len());
        let contribution = (self.rank == root).then_some(&values[..]);
        let out =
            self.run(header(Op::Broadcast, KIND_BYTES, root, len), contribution, true, |mut parts| {
                let data = parts.get_mut(root).and_then(Option::take).unwrap_or_default();
                vec![Some(data); n]
            })?;
        if let Some(bytes) = out {
            self.fill(Op::Broadcast, values, &bytes)?;
        }
        self.record(Op::Broadcast, len);
        Ok(())
    }

    fn barrier(&self) -> std::result::Result<(), CommError> {
        let n = self.world_size;
        self.run(header(Op::Barrier, KIND_BYTES, 0, 0), None, false, |_| vec![None; n])?;
        self.record(Op::Barrier, 0);
        Ok(())
    }

    fn stats(&self) -> CommStats {
        self.stats.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Launcher;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(29_517)
    }

    fn info(rank: usize, world_size: usize, port: u16) -> RankInfo {
        RankInfo {
            rank,
            world_size,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: Launcher::Torchrun,
        }
    }

    #[test]
    fn tcp_collectives_equal_the_in_process_ones() {
        let world_size = 3;
        let port = free_port();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world_size)
                .map(|rank| {
                    s.spawn(move || -> Result<_> {
                        let c =
                            TcpCommunicator::connect(&info(rank, world_size, port), Duration::from_secs(20))?;
                        let r = rank as f32;
                        let mut sum = vec![r, 1.0, 0.1 * r];
                        c.all_reduce_f32(&mut sum)?;
                        let mut norm = [0.5 * rank as f64];
                        c.all_reduce_f64(&mut norm)?;
                        let mut flat: Vec<f32> = (0..2 * world_size).map(|i| i as f32 + r).collect();
                        c.reduce_scatter_f32(&mut flat)?;
                        let mine = flat[2 * rank..2 * rank + 2].to_vec();
                        let mut gathered = vec![0u8; world_size];
                        gathered[rank] = 10 + rank as u8;
                        c.all_gather(&mut gathered)?;
                        let mut root = vec![rank as u8; 3];
                        c.broadcast(&mut root, 1)?;
                        let mut reduced = vec![1.0f32, r];
                        c.reduce_f32(&mut reduced, 2)?;
                        c.barrier()?;
                        Ok((sum, norm, mine, gathered, root, (rank == 2).then_some(reduced), c.stats()))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("no panic")).collect()
        });
        // The in-process backend on the same inputs.
        let local: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = super::super::LocalGroup::ranks(world_size, Duration::from_secs(20))
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let mut sum = vec![r, 1.0, 0.1 * r];
                        c.all_reduce_f32(&mut sum).map(|_| sum)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("no panic")).collect::<Vec<_>>()
        });
        for (rank, result) in results.into_iter().enumerate() {
            let (sum, norm, mine, gathered, root, reduced, stats) = result.expect("no failure");
            let expected = local[rank].as_ref().expect("no failure");
            assert_eq!(&sum, expected, "bit-identical to the in-process sum");
            assert_eq!(norm, [1.5]);
            let i = 2.0 * rank as f32;
            assert_eq!(mine, vec![3.0 * i + 3.0, 3.0 * (i + 1.0) + 3.0]);
            assert_eq!(gathered, vec![10, 11, 12]);
            assert_eq!(root, vec![1, 1, 1]);
            if rank == 2 {
                assert_eq!(reduced, Some(vec![3.0, 3.0]));
            }
            assert_eq!(stats.calls(), 7);
        }
    }

    #[test]
    fn a_peer_that_exits_fails_the_others_and_a_missing_one_times_out() {
        let port = free_port();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || -> Result<()> {
                        let c = TcpCommunicator::connect(&info(rank, 3, port), Duration::from_secs(20))?;
                        if rank == 2 {
                            return Ok(()); // leaves: its socket closes
                        }
                        c.barrier()?;
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("no panic")).collect()
        });
        let hub = results[0].as_ref().expect_err("rank 2 left");
        assert!(matches!(hub.comm(), Some(CommError::PeerLeft { peer: 2, rank: 0, .. })), "{hub}");
        assert!(results[1].is_err(), "rank 1 learns of the failure from rank 0");

        let started = Instant::now();
        let lonely = TcpCommunicator::connect(&info(0, 2, free_port()), Duration::from_millis(300));
        let err = lonely.expect_err("nobody joins");
        assert!(
            matches!(err.comm(), Some(CommError::Timeout { missing, .. }) if missing == &vec![1]),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_rank_that_reaches_another_program_is_refused_before_reading_any_length() {
        // A "server" at MASTER_ADDR:MASTER_PORT that answers garbage announcing a huge length.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut buf = [0u8; HELLO_BYTES];
                let _ = stream.read_exact(&mut buf);
                let _ = stream.write_all(&[0xff; 64]);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let started = Instant::now();
        let err =
            TcpCommunicator::connect(&info(1, 2, port), Duration::from_secs(5)).expect_err("not rank 0");
        assert!(err.to_string().contains("not a candle-fit rank 0"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(4));
        let _ = server.join();

        // A server of another protocol version is named as such.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let server = std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut buf = [0u8; HELLO_BYTES];
                let _ = stream.read_exact(&mut buf);
                let mut answer = hello(0, 2);
                answer[4..8].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
                let _ = stream.write_all(&answer);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let err =
            TcpCommunicator::connect(&info(1, 2, port), Duration::from_secs(5)).expect_err("other version");
        assert!(err.to_string().contains("protocol version"), "{err}");
        let _ = server.join();
    }
}
