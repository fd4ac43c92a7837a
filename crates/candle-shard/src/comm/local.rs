//! An in-process group of ranks, one thread each: the CPU backend every sharding test runs
//! on, usable with any device since buffers are host slices.
//!
//! Each call deposits a copy of the rank's buffer in a shared slot, waits (with the timeout)
//! until every rank has deposited one for the same round, then computes its own result from
//! the slots in rank order, so all ranks get bit-identical sums. A communicator that is dropped
//! (its thread finished, failed or panicked) marks its rank as gone, and peers waiting for it
//! fail at once with [`CommError::PeerLeft`] instead of waiting out the timeout.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{CommStats, Communicator, Op};
use crate::error::CommError;

enum Payload {
    None,
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Call {
    op: Op,
    len: usize,
    /// The element type (`f32`, `f64`, `u8`) and, for broadcast, the root: ranks must agree.
    kind: (&'static str, usize),
}

struct State {
    /// The round (index in every rank's sequence of calls) now collecting contributions.
    round: u64,
    call: Option<(usize, Call)>,
    slots: Vec<Option<Arc<Payload>>>,
    arrived: usize,
    taken: Vec<bool>,
    left: Vec<bool>,
    failure: Option<CommError>,
}

struct Shared {
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

/// Creates the ranks of an in-process group.
#[derive(Debug, Clone, Copy)]
pub struct LocalGroup;

impl LocalGroup {
    /// `world_size` communicators, one per rank in order; move each to its own thread. Every
    /// call waits at most `timeout` for the others.
    ///
    /// # Panics
    /// Never; a `world_size` of 0 gives no communicators.
    pub fn ranks(world_size: usize, timeout: Duration) -> Vec<LocalCommunicator> {
        let shared = Arc::new(Shared {
            world_size,
            timeout,
            state: Mutex::new(State {
                round: 0,
                call: None,
                slots: (0..world_size).map(|_| None).collect(),
                arrived: 0,
                taken: vec![false; world_size],
                left: vec![false; world_size],
                failure: None,
            }),
            changed: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| LocalCommunicator {
                shared: shared.clone(),
                rank,
                round: Cell::new(0),
                stats: Cell::new(CommStats::default()),
            })
            .collect()
    }
}

/// One rank of a [`LocalGroup`].
pub struct LocalCommunicator {
    shared: Arc<Shared>,
    rank: usize,
    round: Cell<u64>,
    stats: Cell<CommStats>,
}

impl std::fmt::Debug for LocalCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.shared.world_size)
            .finish()
    }
}

impl Drop for LocalCommunicator {
    fn drop(&mut self) {
        // A poisoned lock means a peer panicked while holding it; peers find out themselves.
        if let Ok(mut state) = self.shared.state.lock() {
            state.left[self.rank] = true;
            self.shared.changed.notify_all();
        }
    }
}

impl LocalCommunicator {
    fn lock(&self, op: Op) -> Result<MutexGuard<'_, State>, CommError> {
        // Only a panic inside this module's critical sections poisons the lock, and they do not
        // panic; should one, report the peers as gone rather than panicking here too.
        self.shared.state.lock().map_err(|_| CommError::Aborted {
            op,
            rank: self.rank,
            cause: Box::new(CommError::PeerLeft { op, rank: self.rank, peer: self.rank }),
        })
    }

    fn aborted(&self, op: Op, cause: &CommError) -> CommError {
        CommError::Aborted { op, rank: self.rank, cause: Box::new(cause.clone()) }
    }

    /// Waits on the condition variable until `deadline`; true when the deadline has passed.
    fn wait<'a>(
        &self,
        state: MutexGuard<'a, State>,
        deadline: Instant,
        op: Op,
    ) -> Result<(MutexGuard<'a, State>, bool), CommError> {
        let now = Instant::now();
        if now >= deadline {
            return Ok((state, true));
        }
        let (state, _) =
            self.shared.changed.wait_timeout(state, deadline - now).map_err(|_| CommError::Aborted {
                op,
                rank: self.rank,
                cause: Box::new(CommError::PeerLeft { op, rank: self.rank, peer: self.rank }),
            })?;
        Ok((state, false))
    }

    /// Deposits `payload` for this rank's next round and returns every rank's payload, in rank
    /// order, once all have arrived.
    fn exchange(&self, call: Call, payload: Payload) -> Result<Vec<Arc<Payload>>, CommError> {
        let (op, rank, world_size) = (call.op, self.rank, self.shared.world_size);
        let timeout = self.shared.timeout;
        let deadline = Instant::now() + timeout;
        let my_round = self.round.get();
        let mut state = self.lock(op)?;
        // Wait for the previous round to be taken by everyone.
        loop {
            if let Some(cause) = &state.failure {
                return Err(self.aborted(op, cause));
            }
            if state.round == my_round {
                break;
            }
            let (s, timed_out) = self.wait(state, deadline, op)?;
            state = s;
            if timed_out && state.round != my_round {
                let missing = (0..world_size).filter(|&r| !state.taken[r]).collect();
                return Err(self.fail(&mut state, CommError::Timeout { op, rank, timeout, missing }));
            }
        }
        if let Some((peer, peer_call)) = state.call {
            if peer_call != call {
                let e = CommError::Mismatch {
                    op,
                    rank,
                    len: call.len,
                    peer,
                    peer_op: peer_call.op,
                    peer_len: peer_call.len,
                };
                return Err(self.fail(&mut state, e));
            }
        } else {
            state.call = Some((rank, call));
        }
        state.slots[rank] = Some(Arc::new(payload));
        state.arrived += 1;
        self.shared.changed.notify_all();
        // Wait for everyone's contribution.
        loop {
            if let Some(cause) = &state.failure {
                return Err(self.aborted(op, cause));
            }
            if state.arrived == world_size {
                break;
            }
            if let Some(peer) = (0..world_size).find(|&r| state.left[r] && state.slots[r].is_none()) {
                return Err(self.fail(&mut state, CommError::PeerLeft { op, rank, peer }));
            }
            let (s, timed_out) = self.wait(state, deadline, op)?;
            state = s;
            if timed_out && state.arrived < world_size && state.failure.is_none() {
                let missing = (0..world_size).filter(|&r| state.slots[r].is_none()).collect();
                return Err(self.fail(&mut state, CommError::Timeout { op, rank, timeout, missing }));
            }
        }
        let payloads = state.slots.iter().map(|s| s.clone().expect("every rank has arrived")).collect();
        state.taken[rank] = true;
        if state.taken.iter().all(|&t| t) {
            state.slots.iter_mut().for_each(|s| *s = None);
            state.call = None;
            state.arrived = 0;
            state.taken.fill(false);
            state.round += 1;
            self.shared.changed.notify_all();
        }
        self.round.set(my_round + 1);
        Ok(payloads)
    }

    /// Records the group's first failure and returns this rank's error.
    fn fail(&self, state: &mut State, error: CommError) -> CommError {
        if state.failure.is_none() {
            state.failure = Some(error.clone());
        }
        self.shared.changed.notify_all();
        error
    }

    fn record(&self, op: Op, bytes: usize) {
        let mut stats = self.stats.get();
        stats.record(op, bytes, self.shared.world_size);
        self.stats.set(stats);
    }

    fn check_split(&self, op: Op, len: usize) -> Result<usize, CommError> {
        let world_size = self.shared.world_size;
        if len % world_size != 0 {
            return Err(CommError::BadLength { op, rank: self.rank, len, world_size });
        }
        Ok(len / world_size)
    }
}

fn f32s(p: &Payload) -> &[f32] {
    match p {
        Payload::F32(v) => v,
        _ => &[],
    }
}

fn f64s(p: &Payload) -> &[f64] {
    match p {
        Payload::F64(v) => v,
        _ => &[],
    }
}

fn bytes(p: &Payload) -> &[u8] {
    match p {
        Payload::Bytes(v) => v,
        _ => &[],
    }
}

// The length check in `exchange` (same operation, same length on every rank) guarantees that
// every payload read below has the caller's length and kind.

impl Communicator for LocalCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    fn all_reduce_f32(&self, values: &mut [f32]) -> Result<(), CommError> {
        let call = Call { op: Op::AllReduce, len: values.len(), kind: ("f32", 0) };
        let all = self.exchange(call, Payload::F32(values.to_vec()))?;
        values.fill(0.0);
        for p in &all {
            values.iter_mut().zip(f32s(p)).for_each(|(v, &x)| *v += x);
        }
        self.record(Op::AllReduce, values.len() * 4);
        Ok(())
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<(), CommError> {
        let call = Call { op: Op::AllReduce, len: values.len(), kind: ("f64", 0) };
        let all = self.exchange(call, Payload::F64(values.to_vec()))?;
        values.fill(0.0);
        for p in &all {
            values.iter_mut().zip(f64s(p)).for_each(|(v, &x)| *v += x);
        }
        self.record(Op::AllReduce, values.len() * 8);
        Ok(())
    }

    fn reduce_f32(&self, values: &mut [f32], root: usize) -> Result<(), CommError> {
        let world_size = self.shared.world_size;
        if root >= world_size {
            return Err(CommError::BadRoot { op: Op::Reduce, rank: self.rank, root, world_size });
        }
        let call = Call { op: Op::Reduce, len: values.len(), kind: ("f32", root) };
        let all = self.exchange(call, Payload::F32(values.to_vec()))?;
        if self.rank == root {
            values.fill(0.0);
            for p in &all {
                values.iter_mut().zip(f32s(p)).for_each(|(v, &x)| *v += x);
            }
        }
        self.record(Op::Reduce, values.len() * 4);
        Ok(())
    }

    fn reduce_scatter_f32(&self, values: &mut [f32]) -> Result<(), CommError> {
        let chunk = self.check_split(Op::ReduceScatter, values.len())?;
        let call = Call { op: Op::ReduceScatter, len: values.len(), kind: ("f32", 0) };
        let all = self.exchange(call, Payload::F32(values.to_vec()))?;
        let mine = self.rank * chunk..(self.rank + 1) * chunk;
        let out = &mut values[mine.clone()];
        out.fill(0.0);
        for p in &all {
            out.iter_mut().zip(&f32s(p)[mine.clone()]).for_each(|(v, &x)| *v += x);
        }
        self.record(Op::ReduceScatter, values.len() * 4);
        Ok(())
    }

    fn all_gather(&self, values: &mut [u8]) -> Result<(), CommError> {
        let chunk = self.check_split(Op::AllGather, values.len())?;
        let call = Call { op: Op::AllGather, len: values.len(), kind: ("u8", 0) };
        let mine = self.rank * chunk..(self.rank + 1) * chunk;
        let all = self.exchange(call, Payload::Bytes(values[mine].to_vec()))?;
        for (r, p) in all.iter().enumerate() {
            if r != self.rank {
                values[r * chunk..(r + 1) * chunk].copy_from_slice(bytes(p));
            }
        }
        self.record(Op::AllGather, values.len());
        Ok(())
    }

    fn broadcast(&self, values: &mut [u8], root: usize) -> Result<(), CommError> {
        let world_size = self.shared.world_size;
        if root >= world_size {
            return Err(CommError::BadRoot { op: Op::Broadcast, rank: self.rank, root, world_size });
        }
        // The root is part of the call: ranks naming different roots mismatch.
        let call = Call { op: Op::Broadcast, len: values.len(), kind: ("u8", root) };
        let payload = if self.rank == root { Payload::Bytes(values.to_vec()) } else { Payload::None };
        let all = self.exchange(call, payload)?;
        if self.rank != root {
            values.copy_from_slice(bytes(&all[root]));
        }
        self.record(Op::Broadcast, values.len());
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.exchange(Call { op: Op::Barrier, len: 0, kind: ("", 0) }, Payload::None)?;
        self.record(Op::Barrier, 0);
        Ok(())
    }

    fn stats(&self) -> CommStats {
        self.stats.get()
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    fn run<T: Send>(
        world_size: usize,
        timeout: Duration,
        f: impl Fn(LocalCommunicator) -> T + Sync,
    ) -> Vec<T> {
        let comms = LocalGroup::ranks(world_size, timeout);
        thread::scope(|s| {
            let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join().expect("rank threads do not panic")).collect()
        })
    }

    #[test]
    fn collectives_give_every_rank_the_same_results() {
        for world_size in 1..=4 {
            let results = run(world_size, Duration::from_secs(10), |c| -> Result<_, CommError> {
                let r = c.rank() as f32;
                let mut sum = vec![r, 1.0, 2.0 * r];
                c.all_reduce_f32(&mut sum)?;
                let mut flat: Vec<f32> = (0..2 * c.world_size()).map(|i| i as f32 + r).collect();
                c.reduce_scatter_f32(&mut flat)?;
                let mine = flat[2 * c.rank()..2 * c.rank() + 2].to_vec();
                let mut gathered = vec![0u8; c.world_size()];
                gathered[c.rank()] = 10 + c.rank() as u8;
                c.all_gather(&mut gathered)?;
                let mut root = vec![c.rank() as u8; 3];
                c.broadcast(&mut root, c.world_size() - 1)?;
                c.barrier()?;
                let mut reduced = vec![1.0f32, r];
                c.reduce_f32(&mut reduced, 0)?;
                let reduced = (c.rank() == 0).then_some(reduced);
                Ok((sum, mine, gathered, root, reduced, c.stats()))
            });
            let n = world_size as f32;
            let rank_sum = n * (n - 1.0) / 2.0;
            for (rank, result) in results.into_iter().enumerate() {
                let (sum, mine, gathered, root, reduced, stats) = result.expect("no failure");
                if rank == 0 {
                    assert_eq!(reduced, Some(vec![n, rank_sum]));
                }
                assert_eq!(sum, vec![rank_sum, n, 2.0 * rank_sum]);
                let i = 2.0 * rank as f32;
                assert_eq!(mine, vec![n * i + rank_sum, n * (i + 1.0) + rank_sum]);
                assert_eq!(gathered, (0..world_size).map(|r| 10 + r as u8).collect::<Vec<_>>());
                assert_eq!(root, vec![world_size as u8 - 1; 3]);
                assert_eq!(stats.calls(), 6);
                assert_eq!(stats.op(Op::AllReduce).buffer_bytes, 12);
                let expected_sent = 2 * 12 * (world_size - 1) / world_size;
                assert_eq!(stats.op(Op::AllReduce).sent_bytes, expected_sent as u64);
            }
        }
    }

    #[test]
    fn a_rank_that_never_arrives_times_out_naming_it() {
        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let results = run(3, timeout, |c| {
            if c.rank() == 2 {
                thread::sleep(timeout * 5);
                return Ok(());
            }
            c.barrier()
        });
        assert!(started.elapsed() < timeout * 5 + Duration::from_secs(2));
        for result in &results[..2] {
            let timed_out = match result {
                Err(CommError::Timeout { missing, .. }) => missing == &vec![2],
                // The second rank to notice sees the first's failure.
                Err(CommError::Aborted { cause, .. }) => {
                    matches!(**cause, CommError::Timeout { ref missing, .. } if missing == &vec![2])
                }
                _ => false,
            };
            assert!(timed_out, "expected a timeout naming rank 2, got {result:?}");
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_its_peers_at_once() {
        let timeout = Duration::from_secs(30);
        let started = Instant::now();
        let results = run(3, timeout, |c| {
            if c.rank() == 1 {
                drop(c);
                return Ok(());
            }
            let mut v = [1.0f32];
            c.all_reduce_f32(&mut v)
        });
        assert!(started.elapsed() < Duration::from_secs(5), "no waiting for the timeout");
        for result in [&results[0], &results[2]] {
            let err = result.as_ref().expect_err("rank 1 left");
            let named = matches!(err, CommError::PeerLeft { peer: 1, .. })
                || matches!(err, CommError::Aborted { cause, .. } if matches!(**cause, CommError::PeerLeft { peer: 1, .. }));
            assert!(named, "{err}");
        }
    }

    #[test]
    fn mismatched_calls_fail_instead_of_mixing_buffers() {
        let results = run(2, Duration::from_secs(10), |c| {
            let mut v = vec![0.0f32; 2 + c.rank()];
            c.all_reduce_f32(&mut v)
        });
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        let text = format!("{}", results[0].as_ref().expect_err("failed"));
        assert!(text.contains("all_reduce"), "{text}");
    }
}
