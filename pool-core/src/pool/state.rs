//! The pool's locked state and every decision made under its lock.
//!
//! [`State`]'s fields are private: code outside this module changes the state only through
//! methods, and after every change it asks [`State::decide`] what follows from it — which
//! waiters get which worker, which waiters fail, how many workers to launch, which to retire,
//! when to look again. The invariants ("how many workers do we want", "who is served next",
//! "may we launch now") live here, once, and are recomputed on every change, so no change of
//! capacity can be missed (bb8's `internals.rs` is the model).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::lease::Lease;
use crate::config::{Affinity, PoolConfig};
use crate::error::{CallContext, Error, TimeoutKind};
use crate::stats::{BreakerState, Gauges};
use crate::worker::WorkerConn;

/// At most this many permanent workers beyond `size` exist while workers are being recycled:
/// a replacement starts before the worker it replaces stops (make before break), one at a time.
const MAX_SURGE: usize = 1;

/// The settings the decisions depend on, copied from the configuration.
pub(crate) struct Limits {
    size: usize,
    max_overflow: usize,
    max_waiters: usize,
    max_sessions: Option<usize>,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    restart_backoff: Duration,
    restart_backoff_max: Duration,
    prefetch: usize,
    prefetch_wait: Duration,
}

impl Limits {
    pub fn new(config: &PoolConfig) -> Self {
        Limits {
            size: config.size,
            max_overflow: config.max_overflow,
            max_waiters: config.max_waiters,
            max_sessions: config.max_sessions,
            breaker_threshold: config.breaker_threshold,
            breaker_cooldown: config.breaker_cooldown,
            restart_backoff: config.restart_backoff,
            restart_backoff_max: config.restart_backoff_max,
            prefetch: config.prefetch,
            prefetch_wait: config.prefetch_wait,
        }
    }
}

/// Why a worker takes no more calls than it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Retiring {
    /// It is being recycled or retired and stops once its calls have finished.
    Draining(String),
    /// The pool killed it; it is gone once its reader reports the exit.
    Killed(String),
}

/// A live worker and its bookkeeping.
pub(crate) struct Slot {
    pub conn: Arc<WorkerConn>,
    pub overflow: bool,
    in_flight: usize,
    /// Calls it runs at once (its `max_in_flight`, capped by the pool's).
    runs: usize,
    /// Calls it may hold beyond those, queued (prefetch), at most.
    prefetch: usize,
    /// The longest a queued call should expect to wait behind the others.
    prefetch_wait: Duration,
    /// Its recent time per call (EWMA), as the pool sees replies come back; `None` until the
    /// first reply.
    service: Option<Duration>,
    /// When its last reply came back.
    last_reply: Instant,
    /// While it has calls: when it started the one it is running (it became busy, or its
    /// previous call's reply came back).
    busy_since: Instant,
    retiring: Option<Retiring>,
    /// Due for recycling (why): a replacement is wanted; it retires once the replacement is up
    /// and its Strict sessions are gone (or at once, for a hard reason).
    due: Option<String>,
    /// The worker must go even if Strict sessions are bound to it (`max_age`).
    due_hard: bool,
    /// Cancelled calls the worker has not confirmed yet. While any is pending the worker may still
    /// be busy with it (or answer it), so it takes no new calls.
    settling: usize,
    calls: u64,
    recycle_after: Option<u64>,
    /// Strict sessions bound to this worker.
    bound_sessions: usize,
    /// Its `max_age`, jitter drawn.
    pub max_age: Option<Duration>,
    pub started: Instant,
    last_used: Instant,
    pub last_ping: Instant,
    pub pinging: bool,
    pub missed_pings: u32,
    /// Resident memory, sampled by maintenance.
    pub rss: Option<u64>,
}

impl Slot {
    fn available(&self, now: Instant) -> bool {
        self.retiring.is_none() && self.settling == 0 && self.in_flight < self.capacity(now)
    }

    /// Calls it takes now: those it runs at once, plus as many queued ones as it gets through
    /// within `prefetch_wait` at its recent pace (at most `prefetch`). A worker of short calls
    /// gets a deep queue, so it never waits for its next call and replies go out in batches; a
    /// worker of long calls gets none, so a short call never waits behind a long one there.
    /// The call it is running counts as soon as it has run longer than that pace: a worker of
    /// short calls that has just been given a long one takes nothing more until it is back.
    pub fn capacity(&self, now: Instant) -> usize {
        let running = match self.in_flight {
            0 => Duration::ZERO,
            _ => now.saturating_duration_since(self.busy_since),
        };
        let queued = match self.service {
            None if running > self.prefetch_wait => 0,
            None => self.prefetch.min(1),
            Some(service) if service.max(running).is_zero() => self.prefetch,
            Some(service) => {
                let service = service.max(running);
                let fits = self.prefetch_wait.as_nanos() / service.as_nanos();
                self.prefetch
                    .min(usize::try_from(fits).unwrap_or(usize::MAX))
            }
        };
        self.runs + queued
    }

    fn live(&self) -> bool {
        self.retiring.is_none()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Whether it is due for recycling (a replacement is wanted).
    pub fn is_due(&self) -> bool {
        self.due.is_some()
    }

    pub fn last_used(&self) -> Instant {
        self.last_used
    }

    pub fn is_draining(&self) -> bool {
        self.retiring.is_some()
    }

    pub fn was_killed(&self) -> bool {
        matches!(self.retiring, Some(Retiring::Killed(_)))
    }

    /// Due for recycling after `calls`: the drawn limit of `max_calls` (+ jitter).
    fn calls_exhausted(&self) -> bool {
        self.recycle_after.is_some_and(|limit| self.calls >= limit)
    }
}

/// What a waiting caller can be served by.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Any,
    Session { id: Arc<str>, affinity: Affinity },
}

/// A caller waiting in the queue.
pub(crate) struct Waiter {
    pub id: u64,
    pub target: Target,
    pub tx: oneshot::Sender<Result<Lease, Error>>,
    pub context: CallContext,
    /// When its wait ends, and which limit that is.
    pub until: Instant,
    pub kind: TimeoutKind,
    pub started: Instant,
}

impl Waiter {
    fn timeout(&self, now: Instant) -> Error {
        Error::Timeout {
            context: self.context.clone(),
            kind: self.kind,
            waited: now.saturating_duration_since(self.started),
            worker: None,
        }
    }
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
    bound: Option<u64>,
    /// Strict affinity: the worker holding the state went away (its id).
    lost: Option<String>,
    /// Workers that served the session and are still alive (and may hold its state).
    touched: BTreeSet<u64>,
}

impl SessionEntry {
    fn new(affinity: Affinity, now: Instant) -> Self {
        SessionEntry {
            affinity,
            created: now,
            last_used: now,
            calls: 0,
            errors: 0,
            in_flight: 0,
            last_worker: None,
            bound: None,
            lost: None,
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
    /// Failed launches (and workers that died soon after their start) in a row.
    pub failures: u32,
    pub open_until: Instant,
    pub last_error: Option<String>,
    /// No launch before this (backoff after failures).
    backoff_until: Instant,
    /// When the last failure was counted.
    last_failure_at: Instant,
}

/// A worker that finished its handshake, for [`State::install`].
pub(crate) struct NewWorker {
    pub conn: Arc<WorkerConn>,
    pub overflow: bool,
    /// Calls it runs at once.
    pub runs: usize,
    /// Recycle after this many calls (`max_calls` + jitter).
    pub recycle_after: Option<u64>,
    /// Recycle at this age (`max_age` + jitter).
    pub max_age: Option<Duration>,
}

/// A lease to hand to a waiter once the lock is released (sending under the lock could drop a
/// lease, whose release needs the lock).
pub(crate) struct Grant {
    pub tx: oneshot::Sender<Result<Lease, Error>>,
    pub seq: u64,
    pub conn: Arc<WorkerConn>,
}

/// What follows from the state, to be carried out once the lock is released.
#[derive(Default)]
#[must_use = "decisions must be carried out"]
pub(crate) struct Decisions {
    /// Waiters that get a slot.
    pub grants: Vec<Grant>,
    /// Waiters that fail.
    pub failures: Vec<(oneshot::Sender<Result<Lease, Error>>, Error)>,
    /// Workers to launch; `true` for overflow workers.
    pub launches: Vec<bool>,
    /// Workers to stop (already removed from the state and counted as stopping).
    pub retire: Vec<Slot>,
    /// When the decisions may change by themselves (a backoff or cooldown ends).
    pub wake_at: Option<Instant>,
}

pub(crate) struct State {
    limits: Limits,
    phase: Phase,
    workers: BTreeMap<u64, Slot>,
    waiters: VecDeque<Waiter>,
    starting_permanent: usize,
    starting_overflow: usize,
    /// Retired permanent and overflow workers whose processes are still stopping.
    stopping_permanent: usize,
    stopping_overflow: usize,
    breaker: Breaker,
    sessions: HashMap<Arc<str>, SessionEntry>,
    /// Set when a worker reported it cannot start (STARTUP_ERROR) before the pool was up.
    fatal_start_error: Option<String>,
    next_waiter: u64,
    next_worker: u64,
    /// The commands the workers announced, sorted (the union over every HELLO so far).
    commands: Vec<String>,
    /// Sessions whose worker is gone (their waiters must fail): while there are none, the
    /// decisions need not look at every waiter.
    lost_sessions: usize,
}

impl State {
    pub fn new(limits: Limits, now: Instant) -> Self {
        State {
            limits,
            phase: Phase::Running,
            workers: BTreeMap::new(),
            waiters: VecDeque::new(),
            starting_permanent: 0,
            starting_overflow: 0,
            stopping_permanent: 0,
            stopping_overflow: 0,
            breaker: Breaker {
                state: BreakerState::Closed,
                failures: 0,
                open_until: now,
                last_error: None,
                backoff_until: now,
                last_failure_at: now,
            },
            sessions: HashMap::new(),
            fatal_start_error: None,
            next_waiter: 1,
            next_worker: 1,
            commands: Vec::new(),
            lost_sessions: 0,
        }
    }

    // ---- reading --------------------------------------------------------------------------

    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    /// Workers that can take calls now or after their current ones.
    pub fn live_workers(&self) -> usize {
        self.workers.values().filter(|s| s.live()).count()
    }

    pub fn starting(&self) -> usize {
        self.starting_permanent + self.starting_overflow
    }

    pub fn workers(&self) -> impl Iterator<Item = (u64, &Slot)> {
        self.workers.iter().map(|(seq, slot)| (*seq, slot))
    }

    pub fn slot(&self, seq: u64) -> Option<&Slot> {
        self.workers.get(&seq)
    }

    pub fn slot_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        self.workers.get_mut(&seq)
    }

    pub fn worker_name(&self, seq: u64) -> Option<String> {
        self.workers.get(&seq).map(|s| s.conn.id.clone())
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub fn breaker_open(&self) -> bool {
        self.breaker.state != BreakerState::Closed
    }

    pub fn fatal_start_error(&self) -> Option<&str> {
        self.fatal_start_error.as_deref()
    }

    pub fn sessions(&self) -> impl Iterator<Item = (&Arc<str>, &SessionEntry)> {
        self.sessions.iter()
    }

    pub fn commands(&self) -> &[String] {
        &self.commands
    }

    pub fn any_in_flight(&self) -> bool {
        self.workers.values().any(|s| s.in_flight > 0)
    }

    pub fn gauges(&self) -> Gauges {
        let mut gauges = Gauges {
            workers_starting: self.starting(),
            waiters: self.waiters.len(),
            sessions: self.sessions.len(),
            ..Gauges::default()
        };
        let now = Instant::now();
        for slot in self.workers.values() {
            gauges.calls_in_flight += slot.in_flight;
            if slot.retiring.is_some() {
                gauges.workers_draining += 1;
            } else if slot.in_flight >= slot.capacity(now) {
                gauges.workers_busy += 1;
            } else {
                gauges.workers_ready += 1;
            }
        }
        gauges
    }

    /// The breaker's error for a call, when calls must fail fast: the breaker is open and no
    /// worker is alive to serve them.
    pub fn circuit_error(&self, context: &CallContext) -> Option<Error> {
        (self.breaker_open() && self.live_workers() == 0).then(|| Error::CircuitOpen {
            context: context.clone(),
            failures: self.breaker.failures,
            last_error: self.breaker.last_error.clone().unwrap_or_default(),
        })
    }

    // ---- the queue ------------------------------------------------------------------------

    /// Takes a free slot for `target` at once, if no one is waiting ahead.
    pub fn take_now(&mut self, target: &Target) -> Option<(u64, Arc<WorkerConn>)> {
        if !self.waiters.is_empty() {
            return None;
        }
        let now = Instant::now();
        let seq = self.pick(target, now)?;
        let conn = self.take(seq, target, now)?;
        Some((seq, conn))
    }

    /// Whether the queue is full.
    pub fn queue_full(&self) -> Option<usize> {
        (self.waiters.len() >= self.limits.max_waiters).then_some(self.waiters.len())
    }

    /// Queues a waiter (the caller checked [`queue_full`](Self::queue_full)); returns its id.
    pub fn enqueue(&mut self, mut waiter: Waiter) -> u64 {
        waiter.id = self.next_waiter;
        self.next_waiter += 1;
        let id = waiter.id;
        self.waiters.push_back(waiter);
        id
    }

    /// Removes a waiter that stopped waiting. `false` if it was no longer queued (it has been
    /// served or failed meanwhile).
    pub fn leave(&mut self, id: u64) -> bool {
        match self.waiters.iter().position(|w| w.id == id) {
            Some(pos) => {
                self.waiters.remove(pos);
                true
            }
            None => false,
        }
    }

    // ---- slots ----------------------------------------------------------------------------

    /// The worker that should serve `target`, if one is free. Least loaded first, then the one
    /// idle longest, so load spreads over all workers.
    fn pick(&self, target: &Target, now: Instant) -> Option<u64> {
        let best = || {
            self.workers
                .iter()
                .filter(|(_, s)| s.available(now))
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
                        .filter(|seq| self.workers.get(seq).is_some_and(|s| s.available(now)))
                        .or_else(best),
                    Affinity::Strict | Affinity::StrictNoWait => match entry {
                        // Its worker is gone: no other may serve it (it lacks the state).
                        Some(entry) if entry.lost.is_some() => None,
                        Some(SessionEntry {
                            bound: Some(seq), ..
                        }) => Some(*seq)
                            .filter(|seq| self.workers.get(seq).is_some_and(|s| s.available(now))),
                        _ => best(),
                    },
                }
            }
        }
    }

    /// Whether `target` can only be served by one particular worker (a bound Strict session),
    /// or by none (one whose worker is gone): such a waiter left unserved does not mean that
    /// every worker is busy.
    fn pinned(&self, target: &Target) -> bool {
        match target {
            Target::Session {
                id,
                affinity: Affinity::Strict | Affinity::StrictNoWait,
            } => self
                .sessions
                .get(id)
                .is_some_and(|e| e.bound.is_some() || e.lost.is_some()),
            _ => false,
        }
    }

    /// Takes a slot on worker `seq` for a call of `target`; records the session's worker.
    fn take(&mut self, seq: u64, target: &Target, now: Instant) -> Option<Arc<WorkerConn>> {
        let slot = self.workers.get_mut(&seq)?;
        if slot.in_flight == 0 {
            slot.busy_since = now;
        }
        slot.in_flight += 1;
        slot.calls += 1;
        let conn = slot.conn.clone();
        if let Target::Session { id, affinity } = target {
            let live = self.workers.len();
            if let Some(entry) = self.sessions.get_mut(id) {
                entry.last_worker = Some(seq);
                if entry.touched.insert(seq) && entry.touched.len() > live {
                    // Forget workers that are gone, so a long session does not collect them.
                    let workers = &self.workers;
                    entry.touched.retain(|seq| workers.contains_key(seq));
                }
                if matches!(affinity, Affinity::Strict | Affinity::StrictNoWait)
                    && entry.bound.is_none()
                {
                    entry.bound = Some(seq);
                    if let Some(slot) = self.workers.get_mut(&seq) {
                        slot.bound_sessions += 1;
                    }
                }
            }
        }
        Some(conn)
    }

    /// Gives a slot back after its call is settled. `sent` is when its call went out, if it
    /// ended with a reply (it feeds the worker's pace). Returns the recycling reason if the
    /// worker became due (`max_calls`, `max_rss` over `max_rss`), for the log.
    pub fn release(
        &mut self,
        seq: u64,
        now: Instant,
        sent: Option<Instant>,
        max_rss: Option<u64>,
    ) -> Option<String> {
        let slot = self.workers.get_mut(&seq)?;
        slot.in_flight = slot.in_flight.saturating_sub(1);
        slot.last_used = now;
        if let Some(sent) = sent {
            // The worker started this call when it was sent, or when it finished the one before.
            let took = now.saturating_duration_since(sent.max(slot.last_reply));
            slot.service = Some(match slot.service {
                None => took,
                Some(pace) => (pace * 7 + took) / 8,
            });
            slot.last_reply = now;
            // The worker goes on with the next call it holds, if any.
            slot.busy_since = now;
        }
        if slot.retiring.is_some() || slot.due.is_some() {
            return None;
        }
        let reason = if slot.calls_exhausted() {
            Some(format!("served {} calls (max_calls)", slot.calls))
        } else {
            match (slot.rss, max_rss) {
                (Some(rss), Some(max)) if rss > max => {
                    Some(format!("resident memory {rss} bytes exceeds max_rss {max}"))
                }
                _ => None,
            }
        };
        slot.due.clone_from(&reason);
        reason
    }

    /// Marks a cancelled call on worker `seq` as unconfirmed (`true`) or settled (`false`).
    pub fn set_settling(&mut self, seq: u64, settling: bool) {
        if let Some(slot) = self.workers.get_mut(&seq) {
            if settling {
                slot.settling += 1;
            } else {
                slot.settling = slot.settling.saturating_sub(1);
            }
        }
    }

    /// Marks worker `seq` killed; `true` if it was not already.
    pub fn mark_killed(&mut self, seq: u64, reason: &str) -> bool {
        match self.workers.get_mut(&seq) {
            Some(slot) if !slot.was_killed() => {
                slot.retiring = Some(Retiring::Killed(reason.to_owned()));
                true
            }
            _ => false,
        }
    }

    /// Marks worker `seq` due for recycling: `hard` when it must go even with Strict sessions.
    pub fn mark_due(&mut self, seq: u64, reason: String, hard: bool) {
        if let Some(slot) = self.workers.get_mut(&seq) {
            if slot.retiring.is_none() {
                slot.due_hard |= hard;
                if slot.due.is_none() {
                    slot.due = Some(reason);
                }
            }
        }
    }

    // ---- launches -------------------------------------------------------------------------

    /// A number for the next worker.
    pub fn next_worker_seq(&mut self) -> u64 {
        let seq = self.next_worker;
        self.next_worker += 1;
        seq
    }

    /// A launch ended without a worker: forget that it was starting.
    pub fn launch_ended(&mut self, overflow: bool) {
        if overflow {
            self.starting_overflow = self.starting_overflow.saturating_sub(1);
        } else {
            self.starting_permanent = self.starting_permanent.saturating_sub(1);
        }
    }

    /// Counts a failed launch, or a worker that died soon after its start, against the breaker
    /// and the backoff. `fatal` when the worker said it cannot start at all.
    pub fn launch_failed(&mut self, message: String, fatal: bool, now: Instant) {
        if fatal {
            self.fatal_start_error = Some(message.clone());
        }
        let breaker = &mut self.breaker;
        breaker.failures = breaker.failures.saturating_add(1);
        breaker.last_error = Some(message);
        breaker.last_failure_at = now;
        let opens = match breaker.state {
            BreakerState::HalfOpen => true,
            BreakerState::Closed => breaker.failures >= self.limits.breaker_threshold,
            BreakerState::Open => false,
        };
        if opens {
            breaker.state = BreakerState::Open;
            breaker.open_until = now + self.limits.breaker_cooldown;
        }
        let exponent = breaker.failures.saturating_sub(1).min(16);
        let backoff = self
            .limits
            .restart_backoff
            .saturating_mul(1 << exponent)
            .min(self.limits.restart_backoff_max);
        breaker.backoff_until = now + backoff;
    }

    /// Whether the breaker opened (for the log).
    pub fn breaker_just_opened(&self, now: Instant) -> bool {
        self.breaker.state == BreakerState::Open
            && self.breaker.open_until == now + self.limits.breaker_cooldown
    }

    /// Forgives the failed launches once a worker started after the last failure has lived for
    /// `stable_uptime`: launches work again. Returns whether it did.
    pub fn prove_launches(&mut self, now: Instant, stable_uptime: Duration) -> bool {
        if self.breaker.failures == 0 {
            return false;
        }
        let since = self.breaker.last_failure_at;
        let proven = self.workers.values().any(|slot| {
            slot.started >= since && now.saturating_duration_since(slot.started) >= stable_uptime
        });
        if proven {
            self.breaker.failures = 0;
        }
        proven
    }

    /// Adds a worker that finished its handshake. Closes the breaker: a launch works again.
    pub fn install(&mut self, seq: u64, new: NewWorker, now: Instant) {
        let NewWorker {
            conn,
            overflow,
            runs,
            recycle_after,
            max_age,
        } = new;
        if overflow {
            self.starting_overflow = self.starting_overflow.saturating_sub(1);
        } else {
            self.starting_permanent = self.starting_permanent.saturating_sub(1);
        }
        self.breaker.state = BreakerState::Closed;
        for command in &conn.hello.commands {
            if let Err(at) = self.commands.binary_search(command) {
                self.commands.insert(at, command.clone());
            }
        }
        self.workers.insert(
            seq,
            Slot {
                conn,
                overflow,
                in_flight: 0,
                runs,
                prefetch: self.limits.prefetch,
                prefetch_wait: self.limits.prefetch_wait,
                service: None,
                last_reply: now,
                busy_since: now,
                retiring: None,
                due: None,
                due_hard: false,
                settling: 0,
                calls: 0,
                recycle_after,
                bound_sessions: 0,
                max_age,
                started: now,
                last_used: now,
                last_ping: now,
                pinging: false,
                missed_pings: 0,
                rss: None,
            },
        );
    }

    /// A worker is gone (its reader reported the exit): forget it and the Strict sessions bound
    /// to it. Returns its slot and the Strict sessions it held.
    pub fn remove_worker(&mut self, seq: u64) -> Option<(Slot, Vec<Arc<str>>)> {
        let slot = self.workers.remove(&seq)?;
        let mut lost = Vec::new();
        if slot.bound_sessions > 0 {
            for (id, entry) in &mut self.sessions {
                if entry.bound == Some(seq) {
                    entry.bound = None;
                    entry.lost = Some(slot.conn.id.clone());
                    lost.push(id.clone());
                }
            }
            self.lost_sessions += lost.len();
        }
        for entry in self.sessions.values_mut() {
            entry.touched.remove(&seq);
        }
        Some((slot, lost))
    }

    /// A retired worker's process has stopped.
    pub fn stopped(&mut self, overflow: bool) {
        if overflow {
            self.stopping_overflow = self.stopping_overflow.saturating_sub(1);
        } else {
            self.stopping_permanent = self.stopping_permanent.saturating_sub(1);
        }
    }

    // ---- sessions -------------------------------------------------------------------------

    /// Registers a call of session `id` (creating the session) and says which workers may serve
    /// it, or why none may.
    pub fn session_call(
        &mut self,
        id: &Arc<str>,
        requested: Affinity,
        context: &CallContext,
        now: Instant,
    ) -> Result<Target, Error> {
        if !self.sessions.contains_key(id) {
            if let Some(max) = self.limits.max_sessions {
                if self.sessions.len() >= max {
                    return Err(Error::TooManySessions {
                        context: context.clone(),
                        max,
                    });
                }
            }
        }
        let entry = self
            .sessions
            .entry(id.clone())
            .or_insert_with(|| SessionEntry::new(requested, now));
        if let Some(worker) = &entry.lost {
            return Err(Error::SessionWorkerLost {
                context: context.clone(),
                worker: worker.clone(),
            });
        }
        entry.in_flight += 1;
        entry.last_used = now;
        let affinity = entry.affinity;
        if let Some(bound) = entry.bound {
            if let Some(slot) = self.workers.get(&bound) {
                if affinity == Affinity::StrictNoWait && !slot.available(now) {
                    let worker = slot.conn.id.clone();
                    self.session_call_done(id, false, now);
                    return Err(Error::WorkerBusy {
                        context: context.clone(),
                        worker,
                    });
                }
            }
        }
        Ok(Target::Session {
            id: id.clone(),
            affinity,
        })
    }

    /// A call of session `id` has finished (it was registered by [`session_call`]).
    pub fn session_call_done(&mut self, id: &str, failed: bool, now: Instant) {
        if let Some(entry) = self.sessions.get_mut(id) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            entry.calls += 1;
            entry.errors += u64::from(failed);
            entry.last_used = now;
        }
    }

    /// Ends a session: forgets it, fails its queued calls, and returns the workers that may hold
    /// its state (to tell them).
    pub fn end_session(&mut self, id: &str) -> Option<(Vec<Arc<WorkerConn>>, Vec<Waiter>)> {
        let entry = self.sessions.remove(id)?;
        if entry.lost.is_some() {
            self.lost_sessions -= 1;
        }
        if let Some(bound) = entry.bound {
            if let Some(slot) = self.workers.get_mut(&bound) {
                slot.bound_sessions = slot.bound_sessions.saturating_sub(1);
            }
        }
        let conns = entry
            .touched
            .iter()
            .filter_map(|seq| self.workers.get(seq).map(|s| s.conn.clone()))
            .collect();
        let mut queued = Vec::new();
        let mut kept = VecDeque::with_capacity(self.waiters.len());
        for waiter in self.waiters.drain(..) {
            match &waiter.target {
                Target::Session { id: waiting, .. } if &**waiting == id => queued.push(waiter),
                _ => kept.push_back(waiter),
            }
        }
        self.waiters = kept;
        Some((conns, queued))
    }

    /// Sessions unused for `ttl` (and with no call running).
    pub fn expired_sessions(&self, ttl: Duration, now: Instant) -> Vec<Arc<str>> {
        self.sessions
            .iter()
            .filter(|(_, e)| e.in_flight == 0 && now.saturating_duration_since(e.last_used) >= ttl)
            .map(|(id, _)| id.clone())
            .collect()
    }

    // ---- shutdown -------------------------------------------------------------------------

    /// Stops admitting calls; returns the waiters, to fail.
    pub fn close(&mut self) -> Vec<Waiter> {
        self.phase = Phase::Closing;
        self.waiters.drain(..).collect()
    }

    /// Takes every worker out of the state (to stop them).
    pub fn take_all_workers(&mut self) -> Vec<Slot> {
        std::mem::take(&mut self.workers).into_values().collect()
    }

    // ---- the decisions --------------------------------------------------------------------

    /// Everything that follows from the state as it is now. Call after every change.
    pub fn decide(&mut self, now: Instant) -> Decisions {
        let mut out = Decisions::default();
        if self.phase != Phase::Running {
            for waiter in self.waiters.drain(..) {
                let error = Error::ShuttingDown {
                    context: waiter.context.clone(),
                };
                out.failures.push((waiter.tx, error));
            }
            return out;
        }
        self.serve_waiters(now, &mut out);
        self.fail_unservable_waiters(&mut out);
        self.plan_launches(now, &mut out);
        self.plan_retirements(&mut out);
        out
    }

    /// Serves waiters in arrival order. Waiters pinned to a busy worker are skipped, so they do
    /// not hold up everyone behind them; anyone else unserved means every worker is busy.
    /// Waiters whose time ran out are never served: they fail with their timeout.
    fn serve_waiters(&mut self, now: Instant, out: &mut Decisions) {
        let mut i = 0;
        while i < self.waiters.len() {
            let waiter = &self.waiters[i];
            if waiter.tx.is_closed() {
                self.waiters.remove(i);
                continue;
            }
            if waiter.until <= now {
                if let Some(waiter) = self.waiters.remove(i) {
                    let error = waiter.timeout(now);
                    out.failures.push((waiter.tx, error));
                }
                continue;
            }
            let target = waiter.target.clone();
            match self.pick(&target, now) {
                Some(seq) => {
                    let Some(waiter) = self.waiters.remove(i) else {
                        break;
                    };
                    if let Some(conn) = self.take(seq, &target, now) {
                        out.grants.push(Grant {
                            tx: waiter.tx,
                            seq,
                            conn,
                        });
                    }
                }
                None if self.pinned(&target) => i += 1,
                None => break,
            }
        }
    }

    /// Fails waiters that cannot be served: bound to a worker that is gone, or (with the breaker
    /// open) waiting for workers that will not come.
    fn fail_unservable_waiters(&mut self, out: &mut Decisions) {
        let circuit = self.breaker_open() && self.live_workers() == 0;
        if !circuit && self.lost_sessions == 0 {
            return; // Every waiter can still be served: nothing to look at.
        }
        let mut kept = VecDeque::with_capacity(self.waiters.len());
        for waiter in self.waiters.drain(..) {
            let lost = match &waiter.target {
                Target::Session { id, .. } => {
                    self.sessions.get(id).and_then(|entry| match entry.bound {
                        Some(seq) => match self.workers.get(&seq) {
                            Some(slot) if slot.live() => None,
                            Some(slot) => Some(slot.conn.id.clone()),
                            None => Some(format!("w{seq}")),
                        },
                        None => entry.lost.clone(),
                    })
                }
                Target::Any => None,
            };
            if let Some(worker) = lost {
                let error = Error::SessionWorkerLost {
                    context: waiter.context.clone(),
                    worker,
                };
                out.failures.push((waiter.tx, error));
            } else if circuit {
                let error = Error::CircuitOpen {
                    context: waiter.context.clone(),
                    failures: self.breaker.failures,
                    last_error: self.breaker.last_error.clone().unwrap_or_default(),
                };
                out.failures.push((waiter.tx, error));
            } else {
                kept.push_back(waiter);
            }
        }
        self.waiters = kept;
    }

    /// How many workers to launch now, and when to look again if the breaker or the backoff
    /// holds launches back.
    ///
    /// Permanent workers: enough to have `size` of them that are not due for recycling, with at
    /// most [`MAX_SURGE`] processes beyond `size` meanwhile. Overflow workers: one for each
    /// waiting caller that nothing starting will serve, up to `size + max_overflow` processes.
    fn plan_launches(&mut self, now: Instant, out: &mut Decisions) {
        let limits = &self.limits;
        let (mut fresh_permanent, mut permanent_processes) = (0, 0);
        for slot in self.workers.values().filter(|s| !s.overflow) {
            permanent_processes += 1;
            if slot.live() && slot.due.is_none() {
                fresh_permanent += 1;
            }
        }
        permanent_processes += self.starting_permanent + self.stopping_permanent;
        let mut permanent = limits
            .size
            .saturating_sub(fresh_permanent + self.starting_permanent)
            .min((limits.size + MAX_SURGE).saturating_sub(permanent_processes));
        let mut extra = if limits.max_overflow == 0 || self.waiters.is_empty() {
            0
        } else {
            let waiting = self
                .waiters
                .iter()
                .filter(|w| !self.pinned(&w.target))
                .count();
            let processes = self.workers.len()
                + self.starting()
                + self.stopping_permanent
                + self.stopping_overflow
                + permanent;
            waiting
                .saturating_sub(self.starting() + permanent)
                .min((limits.size + limits.max_overflow).saturating_sub(processes))
        };
        if permanent == 0 && extra == 0 {
            return;
        }
        match self.breaker.state {
            BreakerState::Closed if now >= self.breaker.backoff_until => {}
            BreakerState::Closed => {
                out.wake_at = Some(self.breaker.backoff_until);
                return;
            }
            BreakerState::Open if now >= self.breaker.open_until => {
                // One trial launch; the others wait for its outcome.
                self.breaker.state = BreakerState::HalfOpen;
                permanent = permanent.min(1);
                extra = if permanent == 0 { extra.min(1) } else { 0 };
            }
            BreakerState::Open => {
                out.wake_at = Some(self.breaker.open_until);
                return;
            }
            BreakerState::HalfOpen => return,
        }
        for _ in 0..permanent {
            self.starting_permanent += 1;
            out.launches.push(false);
        }
        for _ in 0..extra {
            self.starting_overflow += 1;
            out.launches.push(true);
        }
    }

    /// Retires workers that are done: draining ones with no call left, and workers due for
    /// recycling once a replacement is up (make before break) and their Strict sessions are gone
    /// (unless they must go regardless).
    fn plan_retirements(&mut self, out: &mut Decisions) {
        if !self
            .workers
            .values()
            .any(|s| s.due.is_some() || s.retiring.is_some())
        {
            return;
        }
        let live_permanent = self
            .workers
            .values()
            .filter(|s| !s.overflow && s.live())
            .count();
        // Live permanent workers beyond `size`: that many due ones can go without a gap.
        let mut surplus = live_permanent.saturating_sub(self.limits.size);
        for slot in self.workers.values_mut() {
            if slot.retiring.is_some() {
                continue;
            }
            let Some(reason) = &slot.due else {
                continue;
            };
            if slot.bound_sessions > 0 && !slot.due_hard {
                continue;
            }
            if slot.overflow {
                slot.retiring = Some(Retiring::Draining(reason.clone()));
            } else if surplus > 0 {
                slot.retiring = Some(Retiring::Draining(reason.clone()));
                surplus -= 1;
            }
        }
        let done: Vec<u64> = self
            .workers
            .iter()
            .filter(|(_, s)| {
                matches!(s.retiring, Some(Retiring::Draining(_)))
                    && s.in_flight == 0
                    && s.settling == 0
            })
            .map(|(seq, _)| *seq)
            .collect();
        for seq in done {
            if let Some((slot, _)) = self.remove_worker(seq) {
                if slot.overflow {
                    self.stopping_overflow += 1;
                } else {
                    self.stopping_permanent += 1;
                }
                out.retire.push(slot);
            }
        }
    }
}
