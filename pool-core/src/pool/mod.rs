//! The pool: its shared core, start-up and shutdown. The call path, sessions, launching,
//! maintenance and reporting each have a file of their own; every decision about capacity is
//! [`state::State::decide`]'s.

mod call;
mod launch;
mod lease;
mod maintenance;
mod map;
mod sessions;
mod state;
mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use call::CallOptions;
pub(crate) use call::Caller;
pub use lease::CallStream;
pub use map::{MapOptions, MapStream, MapUnordered};
pub use sessions::SessionEvent;

use crate::config::PoolConfig;
use crate::error::{CallContext, Error};
use crate::launcher::Launcher;
use crate::stats::Metrics;
use crate::worker::ConnSettings;
use state::{Decisions, Limits, State};

/// How a call ended, for statistics.
pub(crate) enum Outcome<'a> {
    Ok,
    Failed(&'a Error),
    /// The caller went away before the reply.
    Abandoned,
}

/// The state shared by a pool's handles and its background tasks.
pub(crate) struct Shared {
    pub(crate) config: PoolConfig,
    /// `config.name`, shared by every call's error context.
    pub(crate) name: Arc<str>,
    pub(crate) launcher: Arc<dyn Launcher>,
    pub(crate) state: Mutex<State>,
    pub(crate) metrics: Metrics,
    /// Woken whenever workers, slots or the breaker change.
    pub(crate) changed: Notify,
    /// Cancelled at shutdown or drop: stops launches and maintenance.
    pub(crate) stopping: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// The runtime the pool was started on. Every background task of the pool runs there, not
    /// on whatever runtime a caller happens to use (a short-lived one may end any time).
    pub(crate) runtime: Handle,
    pub(crate) conn_settings: ConnSettings,
    pub(crate) session_events: broadcast::Sender<SessionEvent>,
    pub(crate) started: Instant,
}

impl Shared {
    /// Runs `task` on the pool's own runtime, tracked so that shutdown waits for it.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn_on(task, &self.runtime);
    }

    /// Carries out what the state decided: hands leases to waiters, fails waiters, starts
    /// launches and stops retired workers. Call with the lock released.
    pub(crate) fn apply(self: &Arc<Self>, decisions: Decisions) {
        let Decisions {
            grants,
            failures,
            launches,
            retire,
            wake_at,
        } = decisions;
        for grant in grants {
            // A waiter that has gone away drops its lease, which releases the slot.
            let _ = grant.tx.send(Ok(self.lease(grant.seq, grant.conn)));
        }
        for (tx, error) in failures {
            self.count_failed_wait(&error);
            let _ = tx.send(Err(error));
        }
        for overflow in launches {
            let shared = self.clone();
            self.spawn(async move { shared.launch(overflow).await });
        }
        for slot in retire {
            self.retire(slot);
        }
        if let Some(at) = wake_at {
            let shared = Arc::downgrade(self);
            let stopping = self.stopping.clone();
            self.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = stopping.cancelled() => return,
                }
                if let Some(shared) = shared.upgrade() {
                    shared.reconsider();
                }
            });
        }
        self.changed.notify_waiters();
    }

    /// Re-runs the decisions (after a timer: a backoff or a cooldown has ended).
    pub(crate) fn reconsider(self: &Arc<Self>) {
        let decisions = self.state.lock().decide(Instant::now());
        self.apply(decisions);
    }

    pub(crate) fn context(&self, session: Option<&Arc<str>>, command: &str) -> CallContext {
        CallContext {
            pool: self.name.clone(),
            command: Arc::from(command),
            session: session.cloned(),
        }
    }
}

/// Kills every worker when the last [`Pool`] handle goes away without a shutdown.
struct DropGuard {
    shared: Arc<Shared>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.shared.stopping.cancel();
        let mut state = self.shared.state.lock();
        drop(state.close());
        for (_, slot) in state.workers() {
            slot.conn.kill();
        }
    }
}

/// A pool of Python workers. Cheap to clone; all clones share the pool.
///
/// A pool starts `size` workers concurrently and counts each ready only after its handshake.
/// Callers are served first come, first served; each call is bounded by `checkout_timeout` (waiting
/// for a worker), `call_timeout` (running) and an optional per-call deadline. Crashed, hung and
/// worn-out workers are replaced in the background. A late reply is never delivered to another
/// caller. [`shutdown`](Pool::shutdown) stops everything gracefully; dropping the last handle kills
/// every worker at once.
///
/// The pool's background work (launching, health checks, cleaning up after cancelled calls) runs
/// on the tokio runtime [`Pool::start`] was called on; calls may come from any runtime.
///
/// # Example
///
/// ```
/// # async fn demo(launcher: std::sync::Arc<dyn pool_core::Launcher>) -> pool_core::Result<()> {
/// use std::time::Duration;
/// use pool_core::{Pool, PoolConfig};
/// use serde_json::json;
///
/// let pool = Pool::start(PoolConfig::new("handlers.py").size(4), launcher).await?;
/// let reply = pool.call("predict", json!({"x": [1, 2, 3]})).await?;
/// println!("{}", reply.value);
/// pool.shutdown(Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.shared.config.name)
            .finish()
    }
}

/// Session events a subscriber may lag behind before it misses some.
const SESSION_EVENT_BUFFER: usize = 1024;

impl Pool {
    /// Starts a pool and waits until `min_ready` workers have completed their handshake.
    ///
    /// All workers launch at once. Fails with [`Error::StartFailed`] (with the last launch error
    /// and the worker's stderr) when a worker reports it cannot start (for instance its app fails to
    /// import), when launches keep failing until the circuit breaker opens, or after
    /// `start_timeout`, or, with [`require_commands`](PoolConfig::require_commands), as soon as the
    /// first ready worker shows that the app lacks one of them. It never hangs, and a failed start
    /// leaves no process behind.
    ///
    /// Must be called within a tokio runtime: the pool's background tasks run on it.
    pub async fn start(config: PoolConfig, launcher: Arc<dyn Launcher>) -> Result<Pool, Error> {
        config.validate()?;
        let now = Instant::now();
        let metrics = Metrics::new();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(Limits::new(&config), now)),
            conn_settings: ConnSettings {
                pool: config.name.clone(),
                max_frame: config.max_frame,
                stream_window: config.stream_window,
                late_replies: metrics.late_replies.clone(),
            },
            metrics,
            changed: Notify::new(),
            stopping: CancellationToken::new(),
            tasks: TaskTracker::new(),
            runtime: Handle::current(),
            session_events: broadcast::channel(SESSION_EVENT_BUFFER).0,
            started: now,
            name: Arc::from(config.name.as_str()),
            config,
            launcher,
        });
        let pool = Pool {
            _guard: Arc::new(DropGuard {
                shared: shared.clone(),
            }),
            shared,
        };
        pool.shared.reconsider();
        pool.shared
            .spawn(maintenance::run(Arc::downgrade(&pool.shared)));
        match pool.wait_ready().await {
            Ok(()) => Ok(pool),
            Err(err) => {
                pool.shutdown(Duration::ZERO).await;
                Err(err)
            }
        }
    }

    async fn wait_ready(&self) -> Result<(), Error> {
        let shared = &self.shared;
        let required = &shared.config.require_commands;
        // Checking the required commands needs one worker's HELLO.
        let wanted = match shared.config.effective_min_ready() {
            0 if !required.is_empty() => 1,
            wanted => wanted,
        };
        let deadline = Instant::now() + shared.config.start_timeout;
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let failed = {
                let state = shared.state.lock();
                let ready = state.live_workers();
                // The commands are the union of every HELLO so far: known once a worker is ready.
                let known = state.commands();
                let missing = if ready > 0 || !known.is_empty() {
                    crate::error::missing_commands(required, known)
                } else {
                    None
                };
                if ready >= wanted && missing.is_none() {
                    return Ok(());
                }
                let last_error = || state.breaker().last_error.as_deref().unwrap_or("none");
                let reason = if let Some(missing) = missing {
                    Some(missing)
                } else if let Some(fatal) = state.fatal_start_error() {
                    Some(fatal.to_owned())
                } else if state.breaker_open() {
                    Some(format!(
                        "{} launches failed in a row; last error: {}",
                        state.breaker().failures,
                        last_error()
                    ))
                } else if Instant::now() >= deadline {
                    Some(format!(
                        "start_timeout of {} expired; last launch error: {}",
                        crate::error::humanize(shared.config.start_timeout),
                        last_error()
                    ))
                } else {
                    None
                };
                reason.map(|reason| (reason, ready))
            };
            if let Some((reason, ready)) = failed {
                return Err(Error::StartFailed {
                    pool: shared.config.name.clone(),
                    ready,
                    wanted,
                    reason,
                });
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// The configuration the pool runs with.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Shuts the pool down gracefully.
    ///
    /// Stops admitting calls and fails waiting callers with [`Error::ShuttingDown`]; lets calls in
    /// flight finish for up to `grace`; then sends SHUTDOWN to every worker, SIGTERM and SIGKILL to
    /// those that do not exit within `stop_grace` each, reaps every process and releases the
    /// transport's resources. Calls still running when `grace` ends fail with
    /// [`Error::ShuttingDown`]. Calling it again, or from several handles, is harmless.
    pub async fn shutdown(&self, grace: Duration) {
        let shared = &self.shared;
        let waiters = shared.state.lock().close();
        for waiter in waiters {
            let _ = waiter.tx.send(Err(Error::ShuttingDown {
                context: waiter.context,
            }));
        }
        shared.stopping.cancel();
        shared.changed.notify_waiters();
        let deadline = Instant::now() + grace;
        loop {
            let notified = shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !shared.state.lock().any_in_flight() {
                break;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let slots = shared.state.lock().take_all_workers();
        let stop_grace = shared.config.stop_grace;
        futures::future::join_all(slots.iter().map(|slot| slot.conn.stop(stop_grace))).await;
        drop(slots);
        shared.tasks.close();
        shared.tasks.wait().await;
        shared.launcher.shutdown().await;
        tracing::info!(pool = %shared.config.name, "pool shut down");
    }
}
