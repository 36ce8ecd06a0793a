//! A checked-out worker slot, the call running on it, flow control of its stream, and what
//! happens when its caller leaves early: CANCEL, a grace period, and a kill if the worker does
//! not confirm.

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
use crate::protocol::ItemError;
use crate::stats::Metrics;
use crate::worker::{Death, Reply, WorkerConn};

/// One slot on one worker, held from checkout until the call on it is settled. Dropping it
/// returns the slot to the pool.
pub(crate) struct Lease {
    shared: Arc<Shared>,
    seq: u64,
    pub(super) conn: Arc<WorkerConn>,
    /// When its call was sent, while the call can still end with a reply (it tells the pool the
    /// worker's pace).
    sent: Option<Instant>,
}

impl Lease {
    pub(super) fn new(shared: Arc<Shared>, seq: u64, conn: Arc<WorkerConn>) -> Self {
        Lease {
            shared,
            seq,
            conn,
            sent: None,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.release(self.seq, self.sent);
    }
}

/// A call's final reply.
pub(crate) struct Answer {
    /// The result; for a batch call, the list of the items' results.
    pub value: Payload,
    /// For a batch call: the items that failed.
    pub failed: Vec<ItemError>,
    /// For a batch call: the worker that answered (errors about its items name it).
    pub worker: Option<String>,
}

impl Answer {
    fn value(value: Payload) -> Self {
        Answer {
            value,
            failed: Vec::new(),
            worker: None,
        }
    }
}

/// A call that has been sent and not yet answered. If it is dropped unanswered (timeout, or the
/// caller went away) the slot stays taken until the worker confirms CANCEL or is killed; that
/// clean-up runs on the pool's own runtime.
pub(crate) struct InFlight {
    lease: Option<Lease>,
    id: u64,
    sent_at: Instant,
    replies: Option<mpsc::Receiver<Reply>>,
    /// Stream items taken since the last CREDIT.
    taken: u32,
}

impl InFlight {
    /// `sent_at`: when the call was handed to the worker's connection.
    pub(super) fn new(
        mut lease: Lease,
        id: u64,
        replies: mpsc::Receiver<Reply>,
        sent_at: Instant,
    ) -> Self {
        lease.sent = Some(sent_at);
        InFlight {
            lease: Some(lease),
            id,
            sent_at,
            replies: Some(replies),
            taken: 0,
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

    /// The consumer took a stream item: once half the window is taken, the worker may send that
    /// many more.
    fn took_item(&mut self) {
        let Some(lease) = &self.lease else {
            return;
        };
        self.taken += 1;
        let window = lease.shared.config.stream_window;
        if self.taken >= window.div_ceil(2) {
            lease.conn.send_credit(self.id, self.taken);
            self.taken = 0;
        }
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

    /// Waits for the final reply and collects streamed items into a list, up to `max_bytes`.
    /// A batch call's reply may carry per-item failures; any other call's may not.
    pub(super) async fn collect(
        &mut self,
        context: &CallContext,
        max_bytes: usize,
        batch: bool,
    ) -> Result<Answer, Error> {
        let mut chunks = Vec::new();
        let mut size = 0usize;
        loop {
            let reply = self.recv().await;
            let terminal = reply.as_ref().is_none_or(Reply::is_terminal);
            if terminal {
                let worker = self.worker_id().to_owned();
                let shared = self.lease.as_ref().map(|l| l.shared.clone());
                self.finish();
                return match reply {
                    Some(Reply::End) if !batch => Ok(Answer::value(merge_chunks(chunks))),
                    Some(Reply::Items(items)) if batch => {
                        let (value, failed) = *items;
                        Ok(Answer {
                            value,
                            failed,
                            worker: Some(worker),
                        })
                    }
                    Some(other) => {
                        reply_error(other, context, &worker, shared.as_deref()).map(|value| {
                            Answer {
                                value,
                                failed: Vec::new(),
                                worker: batch.then_some(worker),
                            }
                        })
                    }
                    None => Err(channel_lost(context, &worker)),
                };
            }
            if let Some(Reply::Chunk(chunk)) = reply {
                let chunk = *chunk;
                if batch {
                    return Err(Error::Protocol {
                        context: context.clone(),
                        worker: self.worker_id().to_owned(),
                        message: "worker streamed items in reply to a batch call".into(),
                    });
                }
                size = size.saturating_add(approximate_size(&chunk));
                chunks.push(chunk);
                if size > max_bytes {
                    // Dropping the unfinished flight (with `self`) cancels the call; the worker
                    // stops producing and lives on.
                    return Err(Error::ReplyTooLarge {
                        context: context.clone(),
                        items: chunks.len() as u64,
                        max: max_bytes,
                    });
                }
                self.took_item();
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let (Some(mut lease), Some(replies)) = (self.lease.take(), self.replies.take()) else {
            return;
        };
        // A cancelled call says nothing about the worker's pace.
        lease.sent = None;
        let id = self.id;
        // Marked before anyone else can check the worker out.
        lease.shared.set_settling(lease.seq, true);
        let shared = lease.shared.clone();
        shared.spawn(settle(lease, id, replies));
    }
}

/// Sends CANCEL and keeps the slot until the worker answers or `cancel_grace` runs out; then kills
/// the worker, because a worker that may still answer must never serve another call. The caller
/// has marked the worker as settling, which keeps new calls away until this ends.
async fn settle(lease: Lease, id: u64, mut replies: mpsc::Receiver<Reply>) {
    let shared = lease.shared.clone();
    Metrics::inc(&shared.metrics.cancels_sent);
    let sent = lease.conn.send_cancel(id);
    let answered = sent
        && tokio::time::timeout(shared.config.cancel_grace, async {
            while let Some(reply) = replies.recv().await {
                match reply {
                    Reply::Cancelled | Reply::Dead(_) => return true,
                    Reply::Chunk(_) => {
                        // Items still in flight: nobody takes them, but the worker may be waiting
                        // for credit to see the cancel, so keep granting.
                        Metrics::inc(&shared.metrics.late_replies);
                        lease.conn.send_credit(id, 1);
                    }
                    Reply::End | Reply::Result(_) | Reply::Items(..) => {
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
    shared: Option<&Shared>,
) -> Result<Payload, Error> {
    match reply {
        Reply::Result(Ok(payload)) => Ok(*payload),
        Reply::Result(Err(error)) => Err(Error::Handler {
            context: context.clone(),
            worker: worker.to_owned(),
            error,
        }),
        Reply::Dead(death) => Err(match shared {
            Some(shared) => shared.death_error(context, *death),
            None => crashed(context, *death),
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
        Reply::Items(..) => Err(Error::Protocol {
            context: context.clone(),
            worker: worker.to_owned(),
            message: "worker sent per-item errors in reply to a call that is not a batch".into(),
        }),
    }
}

fn crashed(context: &CallContext, death: Death) -> Error {
    Error::WorkerCrashed {
        context: context.clone(),
        exit: Box::new(death.exit),
    }
}

impl Shared {
    /// The error for a call whose worker went away: `ShuttingDown` when the pool stopped it,
    /// `WorkerCrashed` otherwise.
    pub(crate) fn death_error(&self, context: &CallContext, death: Death) -> Error {
        if death.stopped {
            Error::ShuttingDown {
                context: context.clone(),
            }
        } else {
            crashed(context, death)
        }
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

/// What a stream item costs to keep: its attachments, and its value's JSON size (bounded below
/// by the cheap count of its nodes).
fn approximate_size(chunk: &Payload) -> usize {
    fn value_size(value: &Value) -> usize {
        match value {
            Value::Null | Value::Bool(_) | Value::Number(_) => 8,
            Value::String(s) => s.len() + 8,
            Value::Array(items) => items.iter().map(value_size).sum::<usize>() + 8,
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| k.len() + value_size(v) + 8)
                .sum::<usize>(),
        }
    }
    chunk.attachment_bytes() + value_size(&chunk.value)
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
/// yields one item. The stream is flow-controlled: the worker produces at most `stream_window`
/// items ahead of the consumer, so a consumer that stops polling costs a bounded amount of
/// memory. The whole stream is bounded by the call timeout (or deadline); dropping the stream
/// before its end cancels the call on the worker and frees the worker once it confirms.
pub struct CallStream {
    flight: Option<InFlight>,
    context: CallContext,
    timer: Pin<Box<Sleep>>,
    timeout_kind: TimeoutKind,
    started: Instant,
    shared: Arc<Shared>,
    session: Option<Arc<str>>,
}

impl std::fmt::Debug for CallStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("context", &self.context)
            .field("finished", &self.flight.is_none())
            .finish()
    }
}

impl CallStream {
    pub(super) fn new(
        flight: InFlight,
        context: CallContext,
        deadline: Instant,
        timeout_kind: TimeoutKind,
        started: Instant,
        shared: Arc<Shared>,
        session: Option<Arc<str>>,
    ) -> Self {
        CallStream {
            flight: Some(flight),
            context,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            timeout_kind,
            started,
            shared,
            session,
        }
    }

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
        match flight.poll_recv(cx) {
            Poll::Ready(Some(Reply::Chunk(chunk))) => {
                flight.took_item();
                Poll::Ready(Some(Ok(*chunk)))
            }
            Poll::Ready(Some(Reply::End)) => {
                this.end(Outcome::Ok);
                Poll::Ready(None)
            }
            Poll::Ready(Some(reply)) => {
                let worker = flight.worker_id().to_owned();
                let item = reply_error(reply, &this.context, &worker, Some(&this.shared));
                this.end(match &item {
                    Ok(_) => Outcome::Ok,
                    Err(err) => Outcome::Failed(err),
                });
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                let err = channel_lost(&this.context, flight.worker_id());
                this.end(Outcome::Failed(&err));
                Poll::Ready(Some(Err(err)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let err = Error::Timeout {
                        context: this.context.clone(),
                        kind: this.timeout_kind,
                        waited: flight.waited(this.timeout_kind, this.started),
                        worker: Some(flight.worker_id().to_owned()),
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
