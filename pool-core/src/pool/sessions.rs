//! Session bookkeeping on the pool's side: registering a session's calls, ending sessions, and
//! the events a program can subscribe to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::state::Target;
use super::{Pool, Shared};
use crate::config::Affinity;
use crate::error::{CallContext, Error};

/// Something that happened to a session without a call asking for it, from
/// [`Pool::session_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The session was unused for `session_ttl`: the pool forgot it and its workers dropped its
    /// state.
    Expired {
        /// The session.
        session: String,
    },
    /// The worker holding a Strict session's state went away; its calls fail with
    /// [`Error::SessionWorkerLost`] until the session is ended or restarted.
    WorkerLost {
        /// The session.
        session: String,
        /// The worker that went away.
        worker: String,
    },
    /// The session was ended with [`Session::end`](crate::Session::end).
    Ended {
        /// The session.
        session: String,
    },
}

impl Shared {
    /// Registers a call of the session and says which workers may serve it. The ended flag is
    /// read under the pool's lock, the same lock [`end_session`](Self::end_session) holds when
    /// it sets it, so a session cannot come back to life after its `end()`.
    pub(crate) fn session_target(
        &self,
        id: &Arc<str>,
        affinity: Affinity,
        ended: Option<&AtomicBool>,
        context: &CallContext,
    ) -> Result<Target, Error> {
        let mut state = self.state.lock();
        if ended.is_some_and(|ended| ended.load(Ordering::Acquire)) {
            return Err(Error::SessionEnded {
                context: context.clone(),
            });
        }
        state.session_call(id, affinity, context, Instant::now())
    }

    /// Ends a session: marks its handles ended, forgets it, fails its queued calls and tells every
    /// worker that may hold its state.
    pub(crate) fn end_session(&self, id: &Arc<str>, ended: &AtomicBool) {
        let removed = {
            let mut state = self.state.lock();
            ended.store(true, Ordering::Release);
            state.end_session(id)
        };
        let Some((conns, queued)) = removed else {
            return;
        };
        for waiter in queued {
            let _ = waiter.tx.send(Err(Error::SessionEnded {
                context: waiter.context,
            }));
        }
        for conn in conns {
            conn.send_session_end(id);
        }
        self.emit(SessionEvent::Ended {
            session: id.to_string(),
        });
    }

    /// Publishes a session event (nobody listening is fine).
    pub(crate) fn emit(&self, event: SessionEvent) {
        let _ = self.session_events.send(event);
    }
}

impl Pool {
    /// Subscribes to session events: expiries, lost workers, ends. Each subscriber has a buffer of
    /// 1024 events; one that falls further behind gets
    /// [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged) and continues with
    /// the newest.
    ///
    /// # Example
    ///
    /// ```
    /// # async fn demo(pool: pool_core::Pool) {
    /// use pool_core::SessionEvent;
    ///
    /// let mut events = pool.session_events();
    /// tokio::spawn(async move {
    ///     while let Ok(event) = events.recv().await {
    ///         if let SessionEvent::Expired { session } = event {
    ///             println!("session {session} expired");
    ///         }
    ///     }
    /// });
    /// # }
    /// ```
    pub fn session_events(&self) -> broadcast::Receiver<SessionEvent> {
        self.shared().session_events.subscribe()
    }
}
