//! The pool's mutable state and the decisions made under its lock: which worker serves which
//! waiter, when to grow, and the circuit breaker.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::lease::Lease;
use crate::config::Affinity;
use crate::error::Error;
use crate::stats::BreakerState;
use crate::worker::WorkerConn;

/// A live worker and its bookkeeping.
pub(crate) struct Slot {
    pub conn: Arc<WorkerConn>,
    pub overflow: bool,
    pub in_flight: usize,
    pub capacity: usize,
    /// Takes no new calls; stopped when `in_flight` reaches 0.
    pub retiring: bool,
    /// Set when the pool killed the worker, with the reason.
    pub killed: Option<String>,
    /// Cancelled calls the worker has not confirmed yet. While any is pending the worker may still
    /// be busy with it (or answer it), so it takes no new calls.
    pub settling: usize,
    pub calls: u64,
    pub recycle_after: Option<u64>,
    pub started: Instant,
    pub last_used: Instant,
    pub last_ping: Instant,
    pub pinging: bool,
    pub missed_pings: u32,
}

impl Slot {
    pub fn available(&self) -> bool {
        !self.retiring && self.settling == 0 && self.in_flight < self.capacity
    }
}

/// What a waiting caller can be served by.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Any,
    Session { id: Arc<str>, affinity: Affinity },
}

pub(crate) struct Waiter {
    pub id: u64,
    pub target: Target,
    pub tx: oneshot::Sender<Result<Lease, Error>>,
}

/// Registry entry of a session.
pub(crate) struct SessionEntry {
    pub affinity: Affinity,
    pub created: Instant,
    pub last_used: Instant,
    pub calls: u64,
    pub errors: u64,
    pub in_flight: usize,
    pub last_worker: Option<u64>,
    /// Strict affinity: the worker holding the state.
    pub bound: Option<u64>,
    /// Workers that served the session (and may hold its state).
    pub touched: BTreeSet<u64>,
}

impl SessionEntry {
    pub fn new(affinity: Affinity, now: Instant) -> Self {
        SessionEntry {
            affinity,
            created: now,
            last_used: now,
            calls: 0,
            errors: 0,
            in_flight: 0,
            last_worker: None,
            bound: None,
            touched: BTreeSet::new(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Phase {
    Running,
    Closing,
}

pub(crate) struct Breaker {
    pub state: BreakerState,
    pub failures: u32,
    pub open_until: Instant,
    pub last_error: Option<String>,
}

pub(crate) struct State {
    pub phase: Phase,
    pub workers: BTreeMap<u64, Slot>,
    pub waiters: VecDeque<Waiter>,
    pub starting_permanent: usize,
    pub starting_overflow: usize,
    /// Retired workers whose processes are still stopping; they count against the pool's size.
    pub stopping: usize,
    pub breaker: Breaker,
    pub sessions: HashMap<Arc<str>, SessionEntry>,
    /// Set when a worker reported it cannot start (STARTUP_ERROR) before the pool was up.
    pub fatal_start_error: Option<String>,
    pub next_waiter: u64,
    pub next_worker: u64,
}

/// A lease to hand to a waiter once the lock is released (sending under the lock could drop a
/// lease, whose release needs the lock).
pub(crate) type Delivery = (oneshot::Sender<Result<Lease, Error>>, Lease);

impl State {
    pub fn new(now: Instant) -> Self {
        State {
            phase: Phase::Running,
            workers: BTreeMap::new(),
            waiters: VecDeque::new(),
            starting_permanent: 0,
            starting_overflow: 0,
            stopping: 0,
            breaker: Breaker {
                state: BreakerState::Closed,
                failures: 0,
                open_until: now,
                last_error: None,
            },
            sessions: HashMap::new(),
            fatal_start_error: None,
            next_waiter: 1,
            next_worker: 1,
        }
    }

    /// Workers that can take calls now or after their current ones (not retiring).
    pub fn live_workers(&self) -> usize {
        self.workers.values().filter(|s| !s.retiring).count()
    }

    pub fn starting(&self) -> usize {
        self.starting_permanent + self.starting_overflow
    }

    /// The worker that should serve `target`, if one is free. Least loaded first, then the one
    /// idle longest, so load spreads over all workers.
    pub fn pick(&self, target: &Target) -> Option<u64> {
        let best = || {
            self.workers
                .iter()
                .filter(|(_, s)| s.available())
                .min_by_key(|(_, s)| (s.in_flight, s.last_used))
                .map(|(seq, _)| *seq)
        };
        match target {
            Target::Any => best(),
            Target::Session { id, affinity } => {
                let entry = self.sessions.get(id);
                match affinity {
                    Affinity::None => best(),
                    Affinity::Prefer => entry
                        .and_then(|e| e.last_worker)
                        .filter(|seq| self.workers.get(seq).is_some_and(Slot::available))
                        .or_else(best),
                    Affinity::Strict => match entry.and_then(|e| e.bound) {
                        Some(seq) => Some(seq)
                            .filter(|seq| self.workers.get(seq).is_some_and(Slot::available)),
                        None => best(),
                    },
                }
            }
        }
    }

    /// Whether `target` waits for one particular worker (so an unserved waiter of this kind does
    /// not mean that every worker is busy).
    fn pinned(&self, target: &Target) -> bool {
        match target {
            Target::Session {
                id,
                affinity: Affinity::Strict,
            } => self.sessions.get(id).and_then(|e| e.bound).is_some(),
            _ => false,
        }
    }

    /// Takes a slot on worker `seq` for a call of `target`; records the session's worker.
    pub fn take(&mut self, seq: u64, target: &Target) -> Option<Arc<WorkerConn>> {
        let slot = self.workers.get_mut(&seq)?;
        slot.in_flight += 1;
        slot.calls += 1;
        let conn = slot.conn.clone();
        if let Target::Session { id, affinity } = target {
            if let Some(entry) = self.sessions.get_mut(id) {
                entry.last_worker = Some(seq);
                entry.touched.insert(seq);
                if *affinity == Affinity::Strict && entry.bound.is_none() {
                    entry.bound = Some(seq);
                }
            }
        }
        Some(conn)
    }

    /// Serves waiters in arrival order. Waiters pinned to a busy worker are skipped, so they do
    /// not hold up everyone behind them; anyone else unserved means every worker is busy.
    pub fn dispatch(
        &mut self,
        mut make_lease: impl FnMut(u64, Arc<WorkerConn>) -> Lease,
    ) -> Vec<Delivery> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].tx.is_closed() {
                self.waiters.remove(i);
                continue;
            }
            let target = self.waiters[i].target.clone();
            match self.pick(&target) {
                Some(seq) => {
                    let Some(waiter) = self.waiters.remove(i) else {
                        break;
                    };
                    if let Some(conn) = self.take(seq, &target) {
                        out.push((waiter.tx, make_lease(seq, conn)));
                    }
                }
                None if self.pinned(&target) => i += 1,
                None => break,
            }
        }
        out
    }

    /// Removes waiters whose session is bound to worker `seq`, which is gone.
    pub fn take_waiters_pinned_to(&mut self, seq: u64) -> Vec<(Waiter, Arc<str>)> {
        let mut lost = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiters.len());
        for waiter in self.waiters.drain(..) {
            let bound_here = match &waiter.target {
                Target::Session {
                    id,
                    affinity: Affinity::Strict,
                } => self.sessions.get(id).and_then(|e| e.bound) == Some(seq),
                _ => false,
            };
            if bound_here {
                if let Target::Session { id, .. } = &waiter.target {
                    let id = id.clone();
                    lost.push((waiter, id));
                }
            } else {
                kept.push_back(waiter);
            }
        }
        self.waiters = kept;
        lost
    }

    pub fn breaker_open(&self) -> bool {
        self.breaker.state != BreakerState::Closed
    }
}
