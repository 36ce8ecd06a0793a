//! Sessions: named handles whose calls are tracked together and, with affinity, kept on the
//! worker that holds their state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::Affinity;
use crate::error::Error;
use crate::payload::Payload;
use crate::pool::{CallOptions, CallStream, Pool};

/// A handle on one session of a pool, from [`Pool::session`] or [`Pool::session_with`].
///
/// The pool registers a session on its first call and tracks its calls, errors, age and last
/// worker (see [`Pool::status`]). With [`Affinity::Prefer`] its calls go to the worker that served
/// it last when that worker is free; with [`Affinity::Strict`] always to the same worker, and if
/// that worker died, calls fail with [`Error::SessionWorkerLost`] instead of silently running
/// where the session's state is missing. A session unused for `session_ttl` expires; calling it
/// again starts it afresh. Handles are cheap to clone and share one session.
///
/// # Example
///
/// ```
/// # async fn demo(pool: pool_core::Pool) -> pool_core::Result<()> {
/// use pool_core::Affinity;
/// use serde_json::json;
///
/// let session = pool.session_with("user-7", Affinity::Strict);
/// session.call("remember", json!({"key": "name", "value": "Ada"})).await?;
/// let name = session.call("recall", json!({"key": "name"})).await?;
/// assert_eq!(name.value, json!("Ada"));
/// session.end().await;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Session {
    pool: Pool,
    id: Arc<str>,
    affinity: Affinity,
    ended: Arc<AtomicBool>,
}

impl Session {
    pub(crate) fn new(pool: Pool, id: Arc<str>, affinity: Affinity) -> Self {
        Session {
            pool,
            id,
            affinity,
            ended: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The session's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn key(&self) -> &Arc<str> {
        &self.id
    }

    pub(crate) fn requested_affinity(&self) -> Affinity {
        self.affinity
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Calls `command` within this session.
    pub async fn call(&self, command: &str, args: impl Into<Payload>) -> Result<Payload, Error> {
        self.call_with(command, args, CallOptions::default()).await
    }

    /// [`call`](Session::call) with per-call options.
    pub async fn call_with(
        &self,
        command: &str,
        args: impl Into<Payload>,
        options: CallOptions,
    ) -> Result<Payload, Error> {
        self.pool
            .shared()
            .call(Some(self), command, args.into(), options)
            .await
    }

    /// Calls a streaming handler within this session.
    pub async fn call_stream(
        &self,
        command: &str,
        args: impl Into<Payload>,
    ) -> Result<CallStream, Error> {
        self.pool
            .shared()
            .call_stream(Some(self), command, args.into(), CallOptions::default())
            .await
    }

    /// Ends the session: forgets it and sends SESSION_END to every worker that served it, so they
    /// drop its state. Later calls on this handle (and its clones) fail with
    /// [`Error::SessionEnded`]; a new handle with the same id starts a fresh session.
    pub async fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.pool.shared().end_session(&self.id).await;
    }
}
