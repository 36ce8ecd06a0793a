//! A checked-out worker slot, the call running on it, and what happens when its caller leaves
//! early: CANCEL, a grace period, and a kill if the worker does not confirm.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use super::{Outcome, Shared};
use crate::error::{CallContext, Error, TimeoutKind, WorkerExit};
use crate::payload::{placeholder_index, Payload};
use crate::stats::Metrics;
use crate::worker::{Reply, WorkerConn};

/// One slot on one worker, held from checkout until the call on it is settled. Dropping it
/// returns the slot to the pool.
pub(crate) struct Lease {
    pub(super) shared: Arc<Shared>,
    pub(super) seq: u64,
    pub(super) conn: Arc<WorkerConn>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.release(self.seq);
    }
}

/// A call that has been sent and not yet answered. If it is dropped unanswered (timeout, or the
/// caller went away) the slot stays taken until the worker confirms CANCEL or is killed.
pub(crate) struct InFlight {
    lease: Option<Lease>,
    id: u64,
    sent_at: Instant,
    replies: Option<mpsc::UnboundedReceiver<Reply>>,
}

impl InFlight {
    pub(super) fn new(lease: Lease, id: u64, replies: mpsc::UnboundedReceiver<Reply>) -> Self {
        InFlight {
            lease: Some(lease),
            id,
            sent_at: Instant::now(),
            replies: Some(replies),
        }
    }

    /// When the call was sent to the worker.
    pub(super) fn sent_at(&self) -> Instant {
        self.sent_at
    }

    /// How long the phase that expired took: execution for `call_timeout`, the whole call
    /// (queue included) for a deadline.
    pub(super) fn waited(&self, kind: TimeoutKind, call_started: Instant) -> std::time::Duration {
        match kind {
            TimeoutKind::Deadline => call_started.elapsed(),
            _ => self.sent_at.elapsed(),
        }
    }

    pub(super) fn worker_id(&self) -> &str {
        self.lease
            .as_ref()
            .map(|l| l.conn.id.as_str())
            .unwrap_or("")
    }

    /// The call got its final reply: the slot can go back to the pool.
    fn finish(&mut self) {
        self.replies = None;
        self.lease = None;
    }

    async fn recv(&mut self) -> Option<Reply> {
        self.replies.as_mut()?.recv().await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Reply>> {
        match self.replies.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }

    /// Waits for the final reply and collects streamed chunks into a list.
    pub(super) async fn collect(&mut self, context: &CallContext) -> Result<Payload, Error> {
        let mut chunks = Vec::new();
        loop {
            let reply = self.recv().await;
            let terminal = reply.as_ref().is_none_or(Reply::is_terminal);
            if terminal {
                let worker = self.worker_id().to_owned();
                self.finish();
                return match reply {
                    Some(Reply::End) => Ok(merge_chunks(chunks)),
                    Some(other) => reply_error(other, context, &worker),
                    None => Err(channel_lost(context, &worker)),
                };
            }
            if let Some(Reply::Chunk(chunk)) = reply {
                chunks.push(chunk);
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let (Some(lease), Some(replies)) = (self.lease.take(), self.replies.take()) else {
            return;
        };
        let id = self.id;
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                // Marked before anyone else can check the worker out.
                lease.shared.set_settling(lease.seq, true);
                handle.spawn(settle(lease, id, replies));
            }
            Err(_) => {
                // No runtime to wait for the worker's answer: it may still answer, so it must go.
                lease.conn.forget(id);
                lease
                    .shared
                    .kill_worker(lease.seq, "its caller was dropped outside a runtime");
            }
        }
    }
}

/// Sends CANCEL and keeps the slot until the worker answers or `cancel_grace` runs out; then kills
/// the worker, because a worker that may still answer must never serve another call. The caller
/// has marked the worker as settling, which keeps new calls away until this ends.
async fn settle(lease: Lease, id: u64, mut replies: mpsc::UnboundedReceiver<Reply>) {
    let shared = lease.shared.clone();
    Metrics::inc(&shared.metrics.cancels_sent);
    let sent = lease.conn.send_cancel(id).await;
    let answered = sent
        && tokio::time::timeout(shared.config.cancel_grace, async {
            while let Some(reply) = replies.recv().await {
                match reply {
                    Reply::Cancelled => return true,
                    Reply::Dead(_) => return true,
                    Reply::Chunk(_) => Metrics::inc(&shared.metrics.late_replies),
                    Reply::End | Reply::Result(_) => {
                        // The call finished after its caller left: nobody gets this reply.
                        Metrics::inc(&shared.metrics.late_replies);
                        return true;
                    }
                }
            }
            true
        })
        .await
        .unwrap_or(false);
    if !answered {
        lease.conn.forget(id);
        shared.kill_worker(lease.seq, "did not answer CANCEL within cancel_grace");
    }
    shared.set_settling(lease.seq, false);
    drop(lease);
}

/// The error for a final reply that is not a success.
pub(super) fn reply_error(
    reply: Reply,
    context: &CallContext,
    worker: &str,
) -> Result<Payload, Error> {
    match reply {
        Reply::Result(Ok(payload)) => Ok(payload),
        Reply::Result(Err(error)) => Err(Error::Handler {
            context: context.clone(),
            worker: worker.to_owned(),
            error: Box::new(error),
        }),
        Reply::Dead(exit) => Err(Error::WorkerCrashed {
            context: context.clone(),
            exit: Box::new(exit),
        }),
        Reply::Cancelled => Err(Error::Protocol {
            context: context.clone(),
            worker: worker.to_owned(),
            message: "worker sent CANCELLED for a call that was not cancelled".into(),
        }),
        Reply::End | Reply::Chunk(_) => Err(Error::Protocol {
            context: context.clone(),
            worker: worker.to_owned(),
            message: "unexpected stream message".into(),
        }),
    }
}

fn channel_lost(context: &CallContext, worker: &str) -> Error {
    Error::WorkerCrashed {
        context: context.clone(),
        exit: Box::new(WorkerExit {
            worker: worker.to_owned(),
            reason: "dropped the call's reply channel".into(),
            exit: None,
            stderr_tail: Vec::new(),
        }),
    }
}

/// Joins streamed chunks into one list value, renumbering attachment placeholders.
fn merge_chunks(chunks: Vec<Payload>) -> Payload {
    let mut merged = Payload::default();
    let mut items = Vec::with_capacity(chunks.len());
    for mut chunk in chunks {
        let offset = merged.attachments.len();
        if offset > 0 {
            shift_placeholders(&mut chunk.value, offset);
        }
        merged.attachments.append(&mut chunk.attachments);
        items.push(chunk.value);
    }
    merged.value = Value::Array(items);
    merged
}

fn shift_placeholders(value: &mut Value, offset: usize) {
    if let Some(index) = placeholder_index(value) {
        *value = serde_json::json!({ crate::protocol::ATTACHMENT_KEY: index + offset });
        return;
    }
    match value {
        Value::Array(items) => items.iter_mut().for_each(|v| shift_placeholders(v, offset)),
        Value::Object(map) => map.values_mut().for_each(|v| shift_placeholders(v, offset)),
        _ => {}
    }
}

/// The items a streaming handler yields, as they arrive.
///
/// Returned by [`Pool::call_stream`](crate::Pool::call_stream) and
/// [`Session::call_stream`](crate::Session::call_stream). A handler that returns a single value
/// yields one item. The whole stream is bounded by the call timeout (or deadline); dropping the
/// stream before its end cancels the call on the worker and frees the worker once it confirms.
pub struct CallStream {
    pub(super) flight: Option<InFlight>,
    pub(super) context: CallContext,
    pub(super) timer: Pin<Box<Sleep>>,
    pub(super) timeout_kind: TimeoutKind,
    pub(super) started: Instant,
    pub(super) shared: Arc<Shared>,
    pub(super) session: Option<Arc<str>>,
}

impl CallStream {
    fn end(&mut self, outcome: Outcome<'_>) {
        if let Some(mut flight) = self.flight.take() {
            // Only a final reply frees the worker at once; after a timeout or an early drop the
            // unfinished flight cancels and settles in the background.
            if matches!(outcome, Outcome::Ok | Outcome::Failed(_))
                && !matches!(outcome, Outcome::Failed(Error::Timeout { .. }))
            {
                flight.finish();
            }
            let took = flight.sent_at.elapsed();
            drop(flight);
            self.shared
                .call_finished(self.session.as_deref(), Some(took), outcome);
        }
    }
}

impl Stream for CallStream {
    type Item = Result<Payload, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(flight) = this.flight.as_mut() else {
            return Poll::Ready(None);
        };
        let worker = flight.worker_id().to_owned();
        match flight.poll_recv(cx) {
            Poll::Ready(Some(Reply::Chunk(chunk))) => Poll::Ready(Some(Ok(chunk))),
            Poll::Ready(Some(Reply::End)) => {
                this.end(Outcome::Ok);
                Poll::Ready(None)
            }
            Poll::Ready(Some(reply)) => {
                let item = reply_error(reply, &this.context, &worker);
                this.end(match &item {
                    Ok(_) => Outcome::Ok,
                    Err(err) => Outcome::Failed(err),
                });
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                let err = channel_lost(&this.context, &worker);
                this.end(Outcome::Failed(&err));
                Poll::Ready(Some(Err(err)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let err = Error::Timeout {
                        context: this.context.clone(),
                        kind: this.timeout_kind,
                        waited: flight.waited(this.timeout_kind, this.started),
                        worker: Some(worker),
                    };
                    // Dropping the unfinished flight sends CANCEL and settles the worker.
                    this.end(Outcome::Failed(&err));
                    Poll::Ready(Some(Err(err)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl Drop for CallStream {
    fn drop(&mut self) {
        if self.flight.is_some() {
            self.end(Outcome::Abandoned);
        }
    }
}
