//! The pool's periodic care: health pings, resident-memory samples, recycling by age, retiring
//! idle overflow workers, forgiving failed launches once a worker proves stable, and expiring
//! sessions.

use std::sync::{Arc, Weak};

use tokio::time::{Instant, MissedTickBehavior};

use super::sessions::SessionEvent;
use super::Shared;
use crate::stats::Metrics;
use crate::worker::WorkerConn;

/// Runs until the pool stops or is dropped (it holds the pool only while it works).
pub(super) async fn run(shared: Weak<Shared>) {
    let Some((mut interval, stopping)) = shared.upgrade().map(|shared| {
        let mut interval = tokio::time::interval(shared.config.maintenance_interval);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        (interval, shared.stopping.clone())
    }) else {
        return;
    };
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stopping.cancelled() => break,
        }
        let Some(shared) = shared.upgrade() else {
            break;
        };
        shared.maintain().await;
    }
}

/// One ping to send: the worker, its connection, and its call count when the ping went out.
struct Ping {
    seq: u64,
    conn: Arc<WorkerConn>,
    calls_before: u64,
}

impl Shared {
    async fn maintain(self: &Arc<Self>) {
        // Resident memory is read from /proc outside the lock, and only when it matters.
        if self.config.max_rss.is_some() {
            let conns: Vec<(u64, Arc<WorkerConn>)> = self
                .state
                .lock()
                .workers()
                .map(|(seq, slot)| (seq, slot.conn.clone()))
                .collect();
            let samples: Vec<(u64, Option<u64>)> = conns
                .iter()
                .map(|(seq, conn)| (*seq, conn.rss_bytes()))
                .collect();
            let mut state = self.state.lock();
            for (seq, rss) in samples {
                if let Some(slot) = state.slot_mut(seq) {
                    slot.rss = rss;
                }
            }
        }
        let now = Instant::now();
        let config = &self.config;
        let mut pings = Vec::new();
        let mut state = self.state.lock();
        let mut due = Vec::new();
        let mut idle_overflow = Vec::new();
        for (seq, slot) in state.workers() {
            if slot.is_draining() {
                continue;
            }
            let age = now.saturating_duration_since(slot.started);
            if let Some(max_age) = slot.max_age {
                if age >= max_age && !slot.is_due() {
                    due.push((
                        seq,
                        format!("older than max_age ({})", crate::error::humanize(max_age)),
                    ));
                }
            }
            if let (Some(max), Some(rss)) = (config.max_rss, slot.rss) {
                if rss > max && !slot.is_due() {
                    due.push((
                        seq,
                        format!("resident memory {rss} bytes exceeds max_rss {max}"),
                    ));
                }
            }
            if slot.overflow
                && slot.in_flight() == 0
                && now.saturating_duration_since(slot.last_used()) >= config.overflow_idle
                && !slot.is_due()
            {
                idle_overflow.push(seq);
            }
            // A local worker's death shows as its process's exit, and a busy one may hold the
            // GIL for as long as its call may run, so only its call deadline bounds it. A remote
            // worker's death shows only as silence, so it is pinged busy or not (the runtime
            // answers pings from its reader thread while handlers run).
            let pingable = slot.in_flight() == 0 || !slot.conn.is_local();
            if pingable
                && !slot.pinging
                && now.saturating_duration_since(slot.last_ping) >= config.ping_interval
            {
                pings.push(Ping {
                    seq,
                    conn: slot.conn.clone(),
                    calls_before: slot.calls(),
                });
            }
        }
        for ping in &pings {
            if let Some(slot) = state.slot_mut(ping.seq) {
                slot.pinging = true;
            }
        }
        for (seq, reason) in due {
            if let Some(name) = state.worker_name(seq) {
                tracing::info!(pool = %config.name, worker = %name, "recycling worker: {reason}");
            }
            Metrics::inc(&self.metrics.recycled);
            // Age is a hard limit: it applies even with Strict sessions bound to the worker.
            let hard = reason.starts_with("older");
            state.mark_due(seq, reason, hard);
        }
        for seq in idle_overflow {
            Metrics::inc(&self.metrics.retired_overflow);
            state.mark_due(seq, "idle overflow worker".into(), false);
        }
        if state.prove_launches(now, config.stable_uptime) {
            tracing::debug!(pool = %config.name, "a worker proved stable: failed launches forgiven");
        }
        let expired = state.expired_sessions(config.session_ttl, now);
        let mut ended = Vec::new();
        for id in expired {
            if let Some((conns, queued)) = state.end_session(&id) {
                Metrics::inc(&self.metrics.sessions_expired);
                debug_assert!(queued.is_empty(), "an expired session has no call");
                ended.push((id, conns));
            }
        }
        let decisions = state.decide(now);
        drop(state);
        self.apply(decisions);
        for (id, conns) in ended {
            tracing::debug!(pool = %config.name, session = %id, "session expired");
            for conn in conns {
                conn.send_session_end(&id);
            }
            self.emit(SessionEvent::Expired {
                session: id.to_string(),
            });
        }
        for ping in pings {
            let shared = self.clone();
            self.spawn(async move {
                let answered = ping.conn.ping(shared.config.ping_timeout).await;
                shared.ping_done(&ping, answered);
            });
        }
    }

    fn ping_done(self: &Arc<Self>, ping: &Ping, answered: bool) {
        let mut state = self.state.lock();
        let Some(slot) = state.slot_mut(ping.seq) else {
            return;
        };
        if !Arc::ptr_eq(&slot.conn, &ping.conn) {
            return;
        }
        slot.pinging = false;
        slot.last_ping = Instant::now();
        if answered {
            slot.missed_pings = 0;
            return;
        }
        // A call that started meanwhile may hold a local worker (and the GIL): not a missed ping.
        if slot.conn.is_local() && (slot.calls() != ping.calls_before || slot.in_flight() > 0) {
            return;
        }
        slot.missed_pings += 1;
        Metrics::inc(&self.metrics.pings_missed);
        if slot.missed_pings >= self.config.max_missed {
            let reason = format!("missed {} pings in a row", slot.missed_pings);
            drop(state);
            self.kill_worker(ping.seq, &reason);
        }
    }
}
