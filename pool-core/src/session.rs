//! Sessions: named handles whose calls are tracked together and, with affinity, kept on the
//! worker that holds their state.

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::Affinity;
use crate::error::Error;
use crate::payload::Payload;
use crate::pool::{CallOptions, CallStream, Caller, Pool};

/// A handle on one session of a pool, from [`Pool::session`] or [`Pool::session_with`].
///
/// The pool registers a session on its first call and tracks its calls, errors, age and last
/// worker (see [`Pool::status`]). With [`Affinity::Prefer`] its calls go to the worker that served
/// it last when that worker is free; with [`Affinity::Strict`] always to the same worker, and if
/// that worker died, calls fail with [`Error::SessionWorkerLost`] instead of silently running
/// where the session's state is missing — until the session is ended or
/// [restarted](Session::restart). A session unused for `session_ttl` expires; calling it again
/// starts it afresh. Handles are cheap to clone and share one session; a temporary handle works
/// too (`pool.session("user-7").call(..)`).
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

impl Pool {
    /// A handle on session `id` with the pool's default affinity. The session is registered on
    /// its first call.
    pub fn session(&self, id: impl Into<String>) -> Session {
        self.session_with(id, self.config().default_affinity)
    }

    /// A handle on session `id` with the given affinity. The affinity is fixed when the session is
    /// first registered; later handles use the registered one.
    pub fn session_with(&self, id: impl Into<String>, affinity: Affinity) -> Session {
        Session {
            pool: self.clone(),
            id: Arc::from(id.into()),
            affinity,
            ended: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Session {
    /// The session's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn caller(&self) -> Caller<'_> {
        Caller {
            session: Some((&self.id, self.affinity)),
            ended: Some(&self.ended),
        }
    }

    /// Calls `command` within this session.
    ///
    /// The returned future owns what it needs, so a temporary handle works:
    /// `pool.session(id).call("predict", args)` can be collected and awaited later.
    pub fn call(
        &self,
        command: &str,
        args: impl Into<Payload>,
    ) -> impl Future<Output = Result<Payload, Error>> + Send + 'static {
        self.call_with(command, args, CallOptions::default())
    }

    /// [`call`](Session::call) with per-call options.
    pub fn call_with(
        &self,
        command: &str,
        args: impl Into<Payload>,
        options: CallOptions,
    ) -> impl Future<Output = Result<Payload, Error>> + Send + 'static {
        let session = self.clone();
        let command = command.to_owned();
        let args = args.into();
        async move {
            session
                .pool
                .shared()
                .call(session.caller(), &command, args, options)
                .await
        }
    }

    /// [`Pool::call_as`] within this session.
    pub fn call_as<R: DeserializeOwned>(
        &self,
        command: &str,
        args: &(impl Serialize + ?Sized),
    ) -> impl Future<Output = Result<R, Error>> + Send + 'static {
        let args = Payload::from_serialize(args);
        let session = self.clone();
        let command = command.to_owned();
        async move {
            let reply = session.call(&command, args?).await?;
            Ok(reply.deserialize()?)
        }
    }

    /// Calls a streaming handler within this session.
    pub fn call_stream(
        &self,
        command: &str,
        args: impl Into<Payload>,
    ) -> impl Future<Output = Result<CallStream, Error>> + Send + 'static {
        let session = self.clone();
        let command = command.to_owned();
        let args = args.into();
        async move {
            session
                .pool
                .shared()
                .call_stream(session.caller(), &command, args, CallOptions::default())
                .await
        }
    }

    /// Ends the session: forgets it and sends SESSION_END to every worker that served it, so they
    /// drop its state. Its calls still waiting for a worker fail with [`Error::SessionEnded`], and
    /// so do later calls on this handle (and its clones); a new handle with the same id starts a
    /// fresh session.
    pub async fn end(&self) {
        self.pool.shared().end_session(&self.id, &self.ended);
    }

    /// Ends the session and starts it over under the same id, with the same affinity: the way
    /// to go on after [`Error::SessionWorkerLost`]. The returned handle's session has fresh state
    /// (on whichever worker serves it next).
    pub async fn restart(&self) -> Session {
        self.end().await;
        self.pool.session_with(self.id.to_string(), self.affinity)
    }
}
