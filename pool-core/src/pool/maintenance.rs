//! The pool's periodic care: health pings of idle workers, retiring idle overflow and old
//! workers, and expiring sessions.

use std::sync::Arc;

use tokio::time::{Instant, MissedTickBehavior};

use super::Shared;
use crate::stats::Metrics;

pub(super) async fn run(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(shared.config.maintenance_interval);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => shared.maintain(),
            _ = shared.stopping.cancelled() => break,
        }
    }
}

impl Shared {
    fn maintain(self: &Arc<Self>) {
        let now = Instant::now();
        let config = &self.config;
        let mut pings = Vec::new();
        let mut retiring = Vec::new();
        let mut expired = Vec::new();
        {
            let mut state = self.state.lock();
            for (seq, slot) in state.workers.iter_mut() {
                if slot.retiring {
                    continue;
                }
                if slot.in_flight > 0 {
                    // A local worker's death shows as its process's exit, and a busy one may hold
                    // the GIL for as long as its call may run, so only its call deadline bounds
                    // it. A remote worker's death shows only as silence, so it is pinged busy or
                    // not (the runtime answers pings from its reader thread while handlers run).
                    if !slot.conn.is_local()
                        && !slot.pinging
                        && now - slot.last_ping >= config.ping_interval
                    {
                        slot.pinging = true;
                        pings.push((*seq, slot.conn.clone(), slot.calls));
                    }
                    continue;
                }
                if slot.overflow && now - slot.last_used >= config.overflow_idle {
                    Metrics::inc(&self.metrics.retired_overflow);
                    retiring.push(*seq);
                } else if config.max_age.is_some_and(|age| now - slot.started >= age) {
                    Metrics::inc(&self.metrics.recycled);
                    retiring.push(*seq);
                } else if !slot.pinging && now - slot.last_ping >= config.ping_interval {
                    slot.pinging = true;
                    pings.push((*seq, slot.conn.clone(), slot.calls));
                }
            }
            let slots: Vec<_> = retiring
                .iter()
                .filter_map(|seq| state.workers.remove(seq))
                .collect();
            state.stopping += slots.len();
            let ttl = config.session_ttl;
            let stale: Vec<_> = state
                .sessions
                .iter()
                .filter(|(_, e)| e.in_flight == 0 && now - e.last_used >= ttl)
                .map(|(id, _)| id.clone())
                .collect();
            for id in stale {
                if let Some(entry) = state.sessions.remove(&id) {
                    Metrics::inc(&self.metrics.sessions_expired);
                    let conns: Vec<_> = entry
                        .touched
                        .iter()
                        .filter_map(|seq| state.workers.get(seq).map(|s| s.conn.clone()))
                        .collect();
                    expired.push((id, conns));
                }
            }
            drop(state);
            for slot in slots {
                tracing::info!(pool = %config.name, worker = %slot.conn.id, "retiring idle worker");
                self.retire(slot);
            }
        }
        for (seq, conn, calls_before) in pings {
            let shared = self.clone();
            self.tasks.spawn(async move {
                let answered = conn.ping(shared.config.ping_timeout).await;
                shared.ping_done(seq, &conn, calls_before, answered);
            });
        }
        for (id, conns) in expired {
            tracing::debug!(pool = %config.name, session = %id, "session expired");
            self.tasks.spawn(async move {
                for conn in conns {
                    conn.send_session_end(&id).await;
                }
            });
        }
    }

    fn ping_done(
        &self,
        seq: u64,
        conn: &Arc<crate::worker::WorkerConn>,
        calls_before: u64,
        answered: bool,
    ) {
        let mut state = self.state.lock();
        let Some(slot) = state.workers.get_mut(&seq) else {
            return;
        };
        if !Arc::ptr_eq(&slot.conn, conn) {
            return;
        }
        slot.pinging = false;
        slot.last_ping = Instant::now();
        if answered {
            slot.missed_pings = 0;
            return;
        }
        // A call that started meanwhile may hold a local worker (and the GIL): not a missed ping.
        if slot.conn.is_local() && (slot.calls != calls_before || slot.in_flight > 0) {
            return;
        }
        slot.missed_pings += 1;
        Metrics::inc(&self.metrics.pings_missed);
        if slot.missed_pings >= self.config.max_missed {
            let reason = format!("missed {} pings in a row", slot.missed_pings);
            drop(state);
            self.kill_worker(seq, &reason);
        }
    }
}
