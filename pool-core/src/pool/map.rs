//! `Pool::map` and `Pool::map_unordered`: many calls of one command, packed into chunks that
//! each travel as one batch CALL, with a bounded number of chunks in flight.

use std::collections::VecDeque;
use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use super::call::{CallOptions, Caller};
use super::lease::Answer;
use super::{Pool, Shared};
use crate::error::{CallContext, Error, TimeoutKind};
use crate::payload::{placeholder_index, Payload};
use crate::protocol::{CallShape, ATTACHMENT_KEY};

/// The largest chunk the pool picks by itself: larger ones delay the first results and hold
/// more replies in memory for little gain (per-frame costs are already small at this size).
const MAX_AUTO_CHUNK: usize = 4096;

/// For inputs of unknown length, chunks grow until one takes about this long from checkout to
/// reply: long enough that per-frame costs vanish, short enough that workers share the tail of
/// the input evenly.
const AUTO_CHUNK_TARGET: Duration = Duration::from_millis(5);

/// Chunks in flight at least, whatever the pool's size: enough for prefetch to keep a worker
/// busy while the replies of its previous chunks travel.
const MIN_CHUNKS_IN_FLIGHT: usize = 8;

/// How a map is run: chunk size, chunks in flight, deadline, and what an item's failure does.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use pool_core::MapOptions;
///
/// let options = MapOptions::new()
///     .chunksize(100)
///     .chunks_in_flight(4)
///     .timeout(Duration::from_secs(30))
///     .stop_on_error(true);
/// assert_eq!(options.get_chunksize(), Some(100));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MapOptions {
    chunksize: Option<NonZeroUsize>,
    chunks_in_flight: Option<NonZeroUsize>,
    deadline: Option<Instant>,
    stop_on_error: bool,
}

impl MapOptions {
    /// Automatic chunk size, automatic chunks in flight, no deadline, every item reported.
    pub fn new() -> Self {
        MapOptions::default()
    }

    /// Items per chunk (one frame, one batch call; the worker iterates the chunk). A chunk is
    /// also closed early when it would exceed the pool's `max_frame`. `0` means automatic.
    ///
    /// Automatic: for an input whose length is known (its iterator's exact `size_hint`), like
    /// `multiprocessing.Pool.map`, `len / (4 × workers)` rounded up, at most 4096; for any other
    /// input, chunks start at one item and grow (at most doubling) while a chunk takes less
    /// than about 5 ms, at most 4096.
    pub fn chunksize(mut self, items: usize) -> Self {
        self.chunksize = NonZeroUsize::new(items);
        self
    }

    /// The chunk size set with [`chunksize`](Self::chunksize), `None` for automatic.
    pub fn get_chunksize(&self) -> Option<usize> {
        self.chunksize.map(NonZeroUsize::get)
    }

    /// Chunks sent or waiting for a worker at once: this bounds the map's memory (items read
    /// ahead of the results, results held back for order) and its share of the pool's queue,
    /// which it shares first-come first-served with every other caller. `0` means automatic:
    /// twice the pool's `size`, at least 8.
    pub fn chunks_in_flight(mut self, chunks: usize) -> Self {
        self.chunks_in_flight = NonZeroUsize::new(chunks);
        self
    }

    /// Sets an absolute deadline for the whole map: each chunk's call carries it, and once it
    /// passes the map ends with [`Error::Timeout`] ([`TimeoutKind::Deadline`]).
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets a deadline `timeout` from now.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.deadline(Instant::now() + timeout)
    }

    /// `true`: the first failed item ends the map (the stream yields that error and ends;
    /// chunks in flight are cancelled). `false` (the default): every item gets its own result.
    pub fn stop_on_error(mut self, stop: bool) -> Self {
        self.stop_on_error = stop;
        self
    }
}

/// An input item: its arguments, or why they cannot be sent (reported as its result).
type Item = Result<Payload, Error>;
type BoxedInput = Box<dyn Source>;

/// A map's input, read a chunk at a time: the loop over a chunk's items is compiled for each
/// input type, behind one dynamic call per chunk (a call per item, moving a 100-byte result
/// each time, cost more than the rest of reading an item).
trait Source: Send {
    /// Reads the next chunk: up to `max_items` items, and no more than `max_bytes` of
    /// arguments (always at least one item). Items that cannot be sent are failed in their
    /// places. `None` once the input is used up.
    fn next_chunk(&mut self, check: &ItemCheck<'_>, max_items: usize) -> Option<Chunk>;
    /// Whether nothing is left to read.
    fn is_done(&self) -> bool;
    /// Stops reading: the rest of the input is dropped unread.
    fn stop(&mut self);
    /// Items read so far.
    fn read(&self) -> usize;
}

/// What an item is checked against before it is sent.
struct ItemCheck<'a> {
    shared: &'a Shared,
    context: &'a CallContext,
    max_bytes: usize,
}

/// The input of a map as an iterator of items.
struct Input<I> {
    items: Option<I>,
    next_index: usize,
    /// An item read for a chunk it did not fit in (by bytes): the next chunk starts with it.
    held: Option<(usize, Payload, usize)>,
}

impl<I> Input<I> {
    fn boxed(items: I) -> BoxedInput
    where
        I: Iterator<Item = Item> + Send + 'static,
    {
        Box::new(Input {
            items: Some(items),
            next_index: 0,
            held: None,
        })
    }
}

impl<I: Iterator<Item = Item> + Send> Source for Input<I> {
    fn next_chunk(&mut self, check: &ItemCheck<'_>, max_items: usize) -> Option<Chunk> {
        let mut chunk = Chunk::new(self.next_index, max_items.min(MAX_AUTO_CHUNK));
        let mut bytes = 0usize;
        if let Some((index, payload, size)) = self.held.take() {
            chunk.start = index;
            bytes = size.saturating_add(1);
            chunk.push(payload);
        }
        while chunk.count < max_items {
            let Some(items) = self.items.as_mut() else {
                break;
            };
            let Some(item) = items.next() else {
                self.items = None;
                break;
            };
            let index = self.next_index;
            self.next_index += 1;
            let checked = item.and_then(|payload| {
                let size = check.shared.check_args(check.context, &payload)?;
                Ok((payload, size))
            });
            match checked {
                Ok((payload, size)) => {
                    let framed = size.saturating_add(1);
                    if !chunk.values.is_empty() && bytes.saturating_add(framed) > check.max_bytes {
                        self.held = Some((index, payload, size));
                        break;
                    }
                    bytes = bytes.saturating_add(framed);
                    chunk.push(payload);
                }
                Err(err) => chunk.fail(err),
            }
        }
        (chunk.count > 0).then_some(chunk)
    }

    fn is_done(&self) -> bool {
        self.items.is_none() && self.held.is_none()
    }

    fn stop(&mut self) {
        self.items = None;
        self.held = None;
    }

    fn read(&self) -> usize {
        self.next_index
    }
}
type ChunkFuture = Pin<Box<dyn Future<Output = ChunkDone> + Send>>;

/// Consecutive items of the input, from `start`, as one batch call sends them.
struct Chunk {
    start: usize,
    /// Items in the chunk, sent or not.
    count: usize,
    /// The arguments of the items to send, their placeholders renumbered into `attachments`.
    values: Vec<Value>,
    attachments: Vec<Bytes>,
    /// Items that cannot be sent, by position in the chunk (ascending), with their errors.
    failed_before: Vec<(usize, Error)>,
    /// Whether every value is one plain value (number, string, bool): the worker is told, and
    /// need not look at each item to know how to pass it to the handler.
    scalars: bool,
}

impl Chunk {
    fn new(start: usize, capacity: usize) -> Self {
        Chunk {
            start,
            count: 0,
            values: Vec::with_capacity(capacity),
            attachments: Vec::new(),
            failed_before: Vec::new(),
            scalars: true,
        }
    }

    fn push(&mut self, payload: Payload) {
        let mut value = payload.value;
        self.scalars &= matches!(value, Value::Number(_) | Value::String(_) | Value::Bool(_));
        if !payload.attachments.is_empty() {
            let offset = self.attachments.len();
            renumber(&mut value, &mut |index| Some(index + offset));
            self.attachments.extend(payload.attachments);
        }
        self.values.push(value);
        self.count += 1;
    }

    fn fail(&mut self, err: Error) {
        self.failed_before.push((self.count, err));
        self.count += 1;
    }
}

/// A chunk's results, or the failure that ends the whole map.
struct ChunkDone {
    results: ChunkResults,
    fatal: Option<Error>,
    /// Items that were sent, and how long the chunk took from checkout to reply.
    sent: usize,
    took: Duration,
}

/// How big the next chunk is.
enum Sizing {
    Fixed(usize),
    /// Unknown input length: grows from 1 towards [`AUTO_CHUNK_TARGET`].
    Adaptive {
        last: usize,
        per_item: Option<Duration>,
    },
}

impl Sizing {
    fn new(options: &MapOptions, hint: (usize, Option<usize>), workers: usize) -> Self {
        if let Some(size) = options.chunksize {
            return Sizing::Fixed(size.get());
        }
        match hint {
            (lower, Some(upper)) if lower == upper => {
                Sizing::Fixed(lower.div_ceil(4 * workers.max(1)).clamp(1, MAX_AUTO_CHUNK))
            }
            _ => Sizing::Adaptive {
                last: 1,
                per_item: None,
            },
        }
    }

    fn next(&mut self) -> usize {
        match self {
            Sizing::Fixed(size) => *size,
            Sizing::Adaptive { last, per_item } => {
                let wanted = match per_item {
                    Some(per_item) if !per_item.is_zero() => {
                        (AUTO_CHUNK_TARGET.as_nanos() / per_item.as_nanos()).max(1) as usize
                    }
                    Some(_) => MAX_AUTO_CHUNK,
                    None => 1,
                };
                *last = wanted.min(last.saturating_mul(2)).clamp(1, MAX_AUTO_CHUNK);
                *last
            }
        }
    }

    /// Learns from a finished chunk how long an item takes (queueing included, which keeps
    /// chunks on the small side when the pool is busy).
    fn learn(&mut self, sent: usize, took: Duration) {
        if let Sizing::Adaptive { per_item, .. } = self {
            if sent == 0 {
                return;
            }
            let sample = took / sent as u32;
            *per_item = Some(match *per_item {
                None => sample,
                Some(old) => (old * 3 + sample) / 4,
            });
        }
    }
}

/// The chunks a map has in flight: in input order or in completion order.
trait ChunkQueue: Stream<Item = ChunkDone> + Unpin + Send {
    fn add(&mut self, chunk: ChunkFuture);
    fn running(&self) -> usize;
    fn cancel_all(&mut self);
}

impl ChunkQueue for FuturesOrdered<ChunkFuture> {
    fn add(&mut self, chunk: ChunkFuture) {
        self.push_back(chunk);
    }
    fn running(&self) -> usize {
        self.len()
    }
    fn cancel_all(&mut self) {
        // Dropping a chunk's call cancels it at its worker.
        *self = FuturesOrdered::new();
    }
}

impl ChunkQueue for FuturesUnordered<ChunkFuture> {
    fn add(&mut self, chunk: ChunkFuture) {
        self.push(chunk);
    }
    fn running(&self) -> usize {
        self.len()
    }
    fn cancel_all(&mut self) {
        self.clear();
    }
}

/// What both map streams share: reading the input into chunks, running them, and collecting
/// their results.
struct Driver<Q> {
    /// Keeps the pool alive while the map runs.
    pool: Pool,
    context: CallContext,
    input: BoxedInput,
    sizing: Sizing,
    chunks_in_flight: usize,
    deadline: Option<Instant>,
    stop_on_error: bool,
    checked: bool,
    running: Q,
    /// The results of the chunk being handed out.
    current: Option<ChunkResults>,
    /// The error that ends the map, yielded after `current`.
    last: Option<(usize, Error)>,
    done: bool,
}

impl<Q: ChunkQueue + Default> Driver<Q> {
    fn new(
        pool: &Pool,
        command: &str,
        input: BoxedInput,
        size_hint: (usize, Option<usize>),
        options: MapOptions,
    ) -> Self {
        let shared = pool.shared();
        let workers = shared.config.size.max(1);
        Driver {
            context: shared.context(None, command),
            sizing: Sizing::new(&options, size_hint, workers),
            chunks_in_flight: options
                .chunks_in_flight
                .map_or((2 * workers).max(MIN_CHUNKS_IN_FLIGHT), NonZeroUsize::get),
            deadline: options.deadline,
            stop_on_error: options.stop_on_error,
            pool: pool.clone(),
            input,
            checked: false,
            running: Q::default(),
            current: None,
            last: None,
            done: false,
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<(usize, Result<Payload, Error>)>> {
        loop {
            if let Some(results) = &mut self.current {
                if let Some(item) = results.next() {
                    if item.1.is_err() && self.stop_on_error {
                        // The error is the last thing the stream yields.
                        self.end();
                    }
                    return Poll::Ready(Some(item));
                }
                self.current = None;
            }
            if let Some(last) = self.last.take() {
                return Poll::Ready(Some((last.0, Err(last.1))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            if !self.checked {
                self.checked = true;
                // A command no worker serves, or a pool shutting down, fails the map once,
                // not once per item.
                if let Err(err) = self.pool.shared().check_command(&self.context) {
                    self.end_with(err);
                    continue;
                }
            }
            while self.running.running() < self.chunks_in_flight {
                match self.next_chunk() {
                    Some(chunk) => self.running.add(Box::pin(run_chunk(
                        self.pool.shared().clone(),
                        self.context.clone(),
                        chunk,
                        self.deadline,
                    ))),
                    None => break,
                }
            }
            match self.running.poll_next_unpin(cx) {
                Poll::Ready(Some(done)) => self.take(done),
                Poll::Ready(None) => {
                    if self.input.is_done() {
                        self.done = true;
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn take(&mut self, done: ChunkDone) {
        if let Some(fatal) = done.fatal {
            self.end_with(fatal);
            return;
        }
        self.sizing.learn(done.sent, done.took);
        self.current = Some(done.results);
    }

    /// The map as a whole failed: the stream yields `err` after the results being handed out
    /// and ends.
    fn end_with(&mut self, err: Error) {
        self.last = Some((self.input.read(), err));
        self.end();
    }

    /// Stops reading and cancels the chunks in flight (the results being handed out stay,
    /// unless the map stops at an error).
    fn end(&mut self) {
        if self.stop_on_error {
            self.current = None;
        }
        self.done = true;
        self.input.stop();
        self.running.cancel_all();
    }

    /// Reads the next chunk from the input: up to the chunk size, and no more bytes than one
    /// frame holds.
    fn next_chunk(&mut self) -> Option<Chunk> {
        let max_items = self.sizing.next();
        let shared = self.pool.shared();
        let check = ItemCheck {
            shared,
            context: &self.context,
            max_bytes: shared
                .config
                .max_frame
                .saturating_sub(Shared::call_overhead(&self.context)),
        };
        self.input.next_chunk(&check, max_items)
    }
}

/// Whether a chunk's failure ends the whole map: it would fail every other chunk the same way.
fn ends_the_map(err: &Error) -> bool {
    matches!(
        err,
        Error::UnknownCommand { .. }
            | Error::ShuttingDown { .. }
            | Error::Timeout {
                kind: TimeoutKind::Deadline,
                ..
            }
    )
}

async fn run_chunk(
    shared: Arc<Shared>,
    context: CallContext,
    chunk: Chunk,
    deadline: Option<Instant>,
) -> ChunkDone {
    let started = Instant::now();
    let Chunk {
        start,
        count,
        values,
        attachments,
        failed_before,
        scalars,
    } = chunk;
    let shape = CallShape::Batch { scalars };
    let sent = values.len();
    let (replies, fatal) = if sent == 0 {
        (Sent::Nothing, None)
    } else {
        let batch = Payload {
            value: Value::Array(values),
            attachments,
        };
        let options = CallOptions { deadline };
        match shared
            .exchange(Caller::POOL, &context.command, batch, options, shape)
            .await
        {
            Ok(answer) => (Sent::from_answer(&context, answer, sent), None),
            Err(err) if ends_the_map(&err) => (Sent::Nothing, Some(err)),
            Err(error) => (Sent::Failed { error, left: sent }, None),
        }
    };
    ChunkDone {
        results: ChunkResults {
            start,
            next_index: start,
            end: start + count,
            failed_before: failed_before.into(),
            replies,
            context,
        },
        fatal,
        sent,
        took: started.elapsed(),
    }
}

/// A chunk's results in input order, each made as it is handed out: the worker's list of
/// values is not first copied into a list of results (the consumer's thread bounds a map's
/// throughput, so work per item there counts).
struct ChunkResults {
    /// The input position of the chunk's first item.
    start: usize,
    /// The input position of the next result.
    next_index: usize,
    end: usize,
    /// Items that were never sent, by position in the chunk. (Queues, not `Peekable`s: its
    /// `next_if` moves the 100-byte error out and back on every item.)
    failed_before: VecDeque<(usize, Error)>,
    /// The results of the items that were sent, in order.
    replies: Sent,
    context: CallContext,
}

impl ChunkResults {
    #[inline]
    fn next(&mut self) -> Option<(usize, Result<Payload, Error>)> {
        if self.next_index >= self.end {
            return None;
        }
        let index = self.next_index;
        self.next_index += 1;
        let position = index - self.start;
        if self
            .failed_before
            .front()
            .is_some_and(|(p, _)| *p == position)
        {
            if let Some((_, err)) = self.failed_before.pop_front() {
                return Some((index, Err(err)));
            }
        }
        let result = self
            .replies
            .next()
            .unwrap_or_else(|| Err(missing(&self.context)));
        Some((index, result))
    }
}

/// The results of a chunk's sent items.
enum Sent {
    /// The worker's results; `failures` (by index among the sent items, ascending) replace
    /// the values of the items whose handler raised.
    Replies {
        replies: Replies,
        failures: VecDeque<(usize, Error)>,
        index: usize,
    },
    /// The same error for each of the `left` items (the chunk's call failed as a whole).
    Failed { error: Error, left: usize },
    /// No item was sent (all failed before), or the map ended with this chunk.
    Nothing,
}

impl Sent {
    fn from_answer(context: &CallContext, answer: Answer, sent: usize) -> Sent {
        let worker = answer.worker.unwrap_or_default();
        let protocol = |message: String| Sent::Failed {
            error: Error::Protocol {
                context: context.clone(),
                worker: worker.clone(),
                message,
            },
            left: sent,
        };
        let Value::Array(values) = answer.value.value else {
            return protocol(
                "the worker answered a batch call with something other than a list".into(),
            );
        };
        if values.len() != sent {
            return protocol(format!(
                "the worker answered a batch of {sent} items with {} results",
                values.len()
            ));
        }
        let replies = if answer.value.attachments.is_empty() {
            Replies::Values(values.into_iter())
        } else {
            match split(values, answer.value.attachments) {
                Ok(parts) => Replies::Parts(parts.into_iter()),
                Err(message) => return protocol(message),
            }
        };
        let mut failures: Vec<(usize, Error)> = answer
            .failed
            .into_iter()
            .filter_map(|failure| {
                let index = usize::try_from(failure.index).ok().filter(|i| *i < sent)?;
                let error = Error::Handler {
                    context: context.clone(),
                    worker: worker.clone(),
                    error: Box::new(failure.error),
                };
                Some((index, error))
            })
            .collect();
        failures.sort_by_key(|(index, _)| *index);
        Sent::Replies {
            replies,
            failures: failures.into(),
            index: 0,
        }
    }

    #[inline]
    fn next(&mut self) -> Option<Result<Payload, Error>> {
        match self {
            Sent::Replies {
                replies,
                failures,
                index,
            } => {
                let payload = replies.next()?;
                let current = *index;
                *index += 1;
                // A repeated index: the first error counts.
                while failures.front().is_some_and(|(i, _)| *i < current) {
                    failures.pop_front();
                }
                if failures.front().is_some_and(|(i, _)| *i == current) {
                    if let Some((_, err)) = failures.pop_front() {
                        return Some(Err(err));
                    }
                }
                Some(Ok(payload))
            }
            Sent::Failed { error, left } => {
                *left = left.checked_sub(1)?;
                Some(Err(error.clone()))
            }
            Sent::Nothing => None,
        }
    }
}

/// A worker's results for a batch: bare values, or payloads with their own attachments.
enum Replies {
    Values(std::vec::IntoIter<Value>),
    Parts(std::vec::IntoIter<Payload>),
}

impl Replies {
    #[inline]
    fn next(&mut self) -> Option<Payload> {
        match self {
            Replies::Values(values) => values.next().map(Payload::new),
            Replies::Parts(parts) => parts.next(),
        }
    }
}

fn missing(context: &CallContext) -> Error {
    Error::Protocol {
        context: context.clone(),
        worker: String::new(),
        message: "the batch reply has no result for this item".into(),
    }
}

/// Splits a batch reply's results (one per item sent) into the items' payloads, each with the
/// attachments its placeholders refer to.
fn split(values: Vec<Value>, all: Vec<Bytes>) -> Result<Vec<Payload>, String> {
    let mut parts = Vec::with_capacity(values.len());
    for mut value in values {
        let mut own = Vec::new();
        let mut local: Vec<(usize, usize)> = Vec::new(); // (index in the reply, index here)
        let mut dangling = false;
        renumber(&mut value, &mut |index| {
            if let Some(&(_, mine)) = local.iter().find(|(theirs, _)| *theirs == index) {
                return Some(mine);
            }
            let Some(bytes) = all.get(index) else {
                dangling = true;
                return None;
            };
            own.push(bytes.clone());
            local.push((index, own.len() - 1));
            Some(own.len() - 1)
        });
        if dangling {
            return Err("a result refers to an attachment the reply does not have".into());
        }
        parts.push(Payload {
            value,
            attachments: own,
        });
    }
    Ok(parts)
}

/// Rewrites every attachment placeholder in `value` through `map` (a placeholder `map` has no
/// answer for is left as it is).
fn renumber(value: &mut Value, map: &mut impl FnMut(usize) -> Option<usize>) {
    if let Some(index) = placeholder_index(value) {
        if let Some(new) = map(index) {
            *value = serde_json::json!({ ATTACHMENT_KEY: new });
        }
        return;
    }
    match value {
        Value::Array(items) => items.iter_mut().for_each(|item| renumber(item, map)),
        Value::Object(fields) => fields.values_mut().for_each(|item| renumber(item, map)),
        _ => {}
    }
}

/// The results of [`Pool::map`], one per input item, in input order.
///
/// The map runs while the stream is polled: it reads items only as chunks can be sent (the
/// input may be endless), keeps at most `chunks_in_flight` chunks outstanding, and holds back
/// at most that many chunks' results to keep order. Dropping the stream cancels the chunks in
/// flight (their workers are sent CANCEL, as for any abandoned call).
pub struct MapStream {
    driver: Driver<FuturesOrdered<ChunkFuture>>,
}

impl Stream for MapStream {
    type Item = Result<Payload, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.driver
            .poll_next(cx)
            .map(|item| item.map(|(_, result)| result))
    }
}

impl std::fmt::Debug for MapStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapStream")
            .field("command", &self.driver.context.command)
            .field("read", &self.driver.input.read())
            .field("chunks_in_flight", &self.driver.running.len())
            .finish()
    }
}

/// The results of [`Pool::map_unordered`], one per input item as it completes, each with the
/// item's 0-based position in the input.
///
/// Like [`MapStream`], but a slow chunk does not hold back the others' results.
pub struct MapUnordered {
    driver: Driver<FuturesUnordered<ChunkFuture>>,
}

impl Stream for MapUnordered {
    type Item = (usize, Result<Payload, Error>);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.driver.poll_next(cx)
    }
}

impl std::fmt::Debug for MapUnordered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapUnordered")
            .field("command", &self.driver.context.command)
            .field("read", &self.driver.input.read())
            .field("chunks_in_flight", &self.driver.running.len())
            .finish()
    }
}

/// A map's input of payloads (or values that convert into them), and its size hint.
fn boxed<I>(items: I) -> (BoxedInput, (usize, Option<usize>))
where
    I: IntoIterator,
    I::Item: Into<Payload>,
    I::IntoIter: Send + 'static,
{
    let items = items.into_iter();
    let hint = items.size_hint();
    (Input::boxed(items.map(|item| Ok(item.into()))), hint)
}

impl Pool {
    /// Calls `command` once per item and yields the results in input order.
    ///
    /// Items travel in chunks: one frame and one batch call carries many items, and the worker
    /// runs the handler on each in turn (an async handler's items run concurrently), so a
    /// million small items cost about a thousand round trips, not a million. Each chunk is an
    /// ordinary call for the pool: it waits its turn in the queue with every other caller,
    /// `call_timeout` limits it, and a chunk lost with its worker fails its items with
    /// [`Error::WorkerCrashed`] (the items are not retried: the pool cannot know whether they
    /// ran).
    ///
    /// Each item gets its own result: a handler that raises for one item fails that item only.
    /// The map as a whole fails — the stream yields that one error and ends — when the command
    /// is unknown, the pool shuts down, or the map's deadline passes. See [`MapOptions`] for
    /// chunk size, memory bounds and stopping at the first error.
    ///
    /// A streaming handler's items are collected into a list, as with [`call`](Pool::call).
    /// The statistics count each chunk as one call.
    ///
    /// # Example
    ///
    /// ```
    /// # async fn demo(pool: pool_core::Pool) -> pool_core::Result<()> {
    /// use futures::StreamExt;
    /// use serde_json::json;
    ///
    /// let mut results = pool.map("square", (0..10_000).map(|i| json!(i)));
    /// while let Some(result) = results.next().await {
    ///     let squared = result?;
    ///     # let _ = squared;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn map<I>(&self, command: &str, items: I) -> MapStream
    where
        I: IntoIterator,
        I::Item: Into<Payload>,
        I::IntoIter: Send + 'static,
    {
        self.map_with(command, items, MapOptions::default())
    }

    /// [`map`](Pool::map) with options.
    pub fn map_with<I>(&self, command: &str, items: I, options: MapOptions) -> MapStream
    where
        I: IntoIterator,
        I::Item: Into<Payload>,
        I::IntoIter: Send + 'static,
    {
        MapStream {
            driver: {
                let (input, hint) = boxed(items);
                Driver::new(self, command, input, hint, options)
            },
        }
    }

    /// Like [`map`](Pool::map), but yields each result as soon as its chunk is back, with the
    /// item's position in the input.
    ///
    /// # Example
    ///
    /// ```
    /// # async fn demo(pool: pool_core::Pool) {
    /// use futures::StreamExt;
    /// use serde_json::json;
    ///
    /// let mut squares = vec![None; 100];
    /// let mut results = pool.map_unordered("square", (0..100).map(|i| json!(i)));
    /// while let Some((index, result)) = results.next().await {
    ///     squares[index] = result.ok();
    /// }
    /// # }
    /// ```
    pub fn map_unordered<I>(&self, command: &str, items: I) -> MapUnordered
    where
        I: IntoIterator,
        I::Item: Into<Payload>,
        I::IntoIter: Send + 'static,
    {
        self.map_unordered_with(command, items, MapOptions::default())
    }

    /// [`map_unordered`](Pool::map_unordered) with options.
    pub fn map_unordered_with<I>(
        &self,
        command: &str,
        items: I,
        options: MapOptions,
    ) -> MapUnordered
    where
        I: IntoIterator,
        I::Item: Into<Payload>,
        I::IntoIter: Send + 'static,
    {
        MapUnordered {
            driver: {
                let (input, hint) = boxed(items);
                Driver::new(self, command, input, hint, options)
            },
        }
    }

    /// [`map`](Pool::map) with any `serde` values as arguments, deserializing each result into
    /// `R`. An item that cannot be serialized, or a result that does not deserialize into `R`,
    /// fails that item with [`Error::Codec`].
    ///
    /// # Example
    ///
    /// ```
    /// # async fn demo(pool: pool_core::Pool) -> pool_core::Result<()> {
    /// use futures::TryStreamExt;
    ///
    /// let squares: Vec<u64> = pool
    ///     .map_as::<u64, _, _>("square", 0..1000u64, pool_core::MapOptions::new())
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(squares.len(), 1000);
    /// # Ok(()) }
    /// ```
    pub fn map_as<R, T, I>(
        &self,
        command: &str,
        items: I,
        options: MapOptions,
    ) -> impl Stream<Item = Result<R, Error>> + Send + 'static
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
        T: Serialize,
        R: DeserializeOwned,
    {
        let items = items.into_iter();
        let hint = items.size_hint();
        let input =
            Input::boxed(items.map(|item| Payload::from_serialize(&item).map_err(Error::from)));
        MapStream {
            driver: Driver::new(self, command, input, hint, options),
        }
        .map(|result| result.and_then(|payload| payload.deserialize().map_err(Error::from)))
    }
}
