//! Pieces the transport benches share: the bench app, latency histograms, the pool side of a
//! round-trip measurement, the floor's blocking echo driver and a raw frame of the size the pool
//! sends, and how figures are summarised and printed.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pool_core::protocol::{decode, encode, Codec, Message};
use pool_core::Pool;
use serde_json::{json, Value};

/// A typical app: sync handlers only (an app with async handlers also loads asyncio).
pub const BENCH_APP: &str =
    "from pypool_worker import handler\n\n@handler\ndef echo(value):\n    return value\n";

/// Writes [`BENCH_APP`] into `dir` and returns its path.
pub fn write_bench_app(dir: &Path) -> std::io::Result<String> {
    let app = dir.join("bench_app.py");
    std::fs::write(&app, BENCH_APP)?;
    Ok(app.to_string_lossy().into_owned())
}

/// The arguments of the no-op call every bench times.
pub fn noop_args() -> Value {
    json!({"value": 1})
}

/// A latency histogram in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // Constant bounds: cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds")
}

/// The CALL the pool sends for the no-op call every bench times (`echo` of [`noop_args`], the
/// default call timeout and stream window), with request id `id`.
pub fn noop_call(id: u64) -> Message {
    Message::Call {
        id,
        command: "echo".into(),
        args: noop_args(),
        session: None,
        timeout_ms: Some(60_000),
        window: Some(16),
        batch: false,
        scalars: false,
    }
}

/// `body` as a length-prefixed frame, in one buffer.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

/// A length-prefixed frame as large as the pool's CALL of [`noop_args`], for the raw floor.
pub fn call_sized_frame() -> Vec<u8> {
    // Encoding a constant message cannot fail.
    framed(&encode(&noop_call(1_000_000), Codec::Json, &[]).expect("constant message encodes"))
}

/// The body of a Python script that answers pypool CALLs doing what the wire format requires
/// and nothing more, with the codec pypool would use with that interpreter (MessagePack if it
/// can import `msgpack`, else the stdlib's `marshal`): it decodes each CALL's header, calls the
/// handler it names with the call's arguments, encodes the RESULT header, and writes every
/// reply of a read at once. It first writes its codec's byte. Append a line calling `serve(read, write)` with `read()`
/// returning the bytes that arrived and `write(data)` the number of bytes written;
/// [`protocol_round_trips`] drives it. It is the floor of any worker speaking this protocol,
/// next to the raw echoes' floor of any worker at all.
pub const PROTOCOL_ECHO_SERVE: &str = include_str!("protocol_echo.py");

/// `rounds` sequential round trips with a [`PROTOCOL_ECHO_SERVE`] process: each encodes the
/// no-op CALL (ids from `first_id`) and decodes the RESULT with pool-core's codec, as the pool
/// does, and checks the value. `codec` is the echo's, once read (`None` before the first
/// round trips: its announcement is read first). Returns the codec and each round trip's time.
pub async fn protocol_round_trips<R, W>(
    reader: &mut tokio::io::BufReader<R>,
    writer: &mut W,
    codec: Option<Codec>,
    first_id: u64,
    rounds: usize,
) -> std::io::Result<(Codec, Vec<Duration>)>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let codec = match codec {
        Some(codec) => codec,
        None => match reader.read_u8().await? {
            b'M' => Codec::Msgpack,
            b'S' => Codec::Marshal,
            other => {
                return Err(std::io::Error::other(format!(
                    "the protocol echo announced codec byte {other:#04x}"
                )))
            }
        },
    };
    let expected = noop_args()["value"].clone();
    let mut times = Vec::with_capacity(rounds);
    for id in first_id..first_id + rounds as u64 {
        let t = Instant::now();
        let body = encode(&noop_call(id), codec, &[]).map_err(std::io::Error::other)?;
        writer.write_all(&framed(&body)).await?;
        let len = reader.read_u32().await? as usize;
        let mut back = vec![0u8; len];
        reader.read_exact(&mut back).await?;
        match decode(back.into()).map_err(std::io::Error::other)?.0 {
            Message::Result {
                id: got,
                ok: Some(value),
                ..
            } if got == id && value == expected => {}
            other => {
                return Err(std::io::Error::other(format!(
                    "the protocol echo answered {other:?}"
                )))
            }
        }
        times.push(t.elapsed());
    }
    Ok((codec, times))
}

/// The CPUs this process may run on (`taskset` sets it for the whole tree).
pub fn cpus_allowed() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
}

/// The median of some values and their range, as JSON `{"median", "min", "max"}` rounded to
/// three decimals (empty input: all zero).
pub fn figure(values: &[f64]) -> Value {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return json!({"median": 0.0, "min": 0.0, "max": 0.0});
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({"median": r(median), "min": r(v[0]), "max": r(v[n - 1])})
}

/// Mean, p50 and p99 of one repeat's round trips, in microseconds (sorts `samples`; empty:
/// all zero).
pub fn round_trip_stats(samples: &mut [Duration]) -> [f64; 3] {
    if samples.is_empty() {
        return [0.0; 3];
    }
    samples.sort_unstable();
    let total: Duration = samples.iter().sum();
    let at = |q: f64| {
        let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e6
    };
    [
        total.as_secs_f64() * 1e6 / samples.len() as f64,
        at(0.5),
        at(0.99),
    ]
}

/// `rounds` sequential no-op calls through the pool, from a runtime task (as a service's
/// handler makes them), each timed.
pub async fn time_pool_block(
    pool: &Pool,
    rounds: usize,
) -> Result<Vec<Duration>, pool_core::Error> {
    let pool = pool.clone();
    match tokio::spawn(async move {
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            pool.call("echo", noop_args()).await?;
            times.push(t.elapsed());
        }
        Ok(times)
    })
    .await
    {
        Ok(result) => result,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

/// A [`figure`] as `median (min–max)` with one decimal.
pub fn fmt_figure(f: &Value) -> String {
    let g = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    format!("{:.1} ({:.1}–{:.1})", g("median"), g("min"), g("max"))
}

/// A [`figure`] of ratios as `median x (min–max)`.
pub fn fmt_ratio(f: &Value) -> String {
    let g = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    format!("{:.2}x ({:.2}–{:.2})", g("median"), g("min"), g("max"))
}

/// A raw echo driven with blocking `std` I/O from a thread of its own: the floor. The thread
/// owns the echo process and its two ends; each [`block`](BlockingEcho::block) times `rounds`
/// round trips of `frame`. Dropping it closes the ends (the echo sees EOF) and reaps the process.
pub struct BlockingEcho {
    run: mpsc::Sender<usize>,
    done: mpsc::Receiver<std::io::Result<Vec<Duration>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BlockingEcho {
    /// Drives the echo process `child` through `writer` and `reader` (its stdin and stdout, or
    /// two handles of one socket).
    pub fn spawn<W, R>(
        mut child: std::process::Child,
        mut writer: W,
        mut reader: R,
        frame: Arc<[u8]>,
    ) -> BlockingEcho
    where
        W: Write + Send + 'static,
        R: Read + Send + 'static,
    {
        let (run, runs) = mpsc::channel::<usize>();
        let (finished, done) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut back = vec![0u8; frame.len()];
            for rounds in runs {
                let mut times = Vec::with_capacity(rounds);
                let result = (|| {
                    for _ in 0..rounds {
                        let t = Instant::now();
                        writer.write_all(&frame)?;
                        reader.read_exact(&mut back)?;
                        times.push(t.elapsed());
                    }
                    Ok(())
                })();
                let _ = finished.send(result.map(|()| times));
            }
            drop(writer);
            drop(reader);
            let _ = child.wait();
        });
        BlockingEcho {
            run,
            done,
            thread: Some(thread),
        }
    }

    /// Times `rounds` round trips.
    pub fn block(&self, rounds: usize) -> std::io::Result<Vec<Duration>> {
        self.run.send(rounds).map_err(std::io::Error::other)?;
        self.done.recv().map_err(std::io::Error::other)?
    }
}

impl Drop for BlockingEcho {
    fn drop(&mut self) {
        // A closed run channel ends the thread's loop.
        let (run, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.run, run));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The contenders of a latency run, in the order of [`latency_summary`]'s figures: the raw echo
/// driven with blocking I/O, the raw echo driven by tokio, and the pool. A bench may put more
/// contenders between the raw echoes and the pool.
pub const LATENCY_CONTENDERS: [&str; 3] = ["raw_blocking", "raw_tokio", "pypool"];

/// A latency run's JSON: per contender (`names`: the two raw echoes of [`LATENCY_CONTENDERS`]
/// first, the pool last), the [`figure`] of its mean, p50 and p99 over the repeats and every
/// repeat's, plus `floor` (the faster raw echo of each repeat); and the pool's mean over every
/// other contender's and over the floor, repeat by repeat. `figures[c]` holds contender `c`'s
/// `[mean, p50, p99]` per repeat.
pub fn latency_summary(names: &[&str], figures: &[Vec<[f64; 3]>]) -> (Value, Value) {
    let mut out = serde_json::Map::new();
    for (f, name) in figures.iter().zip(names) {
        let pick = |i: usize| f.iter().map(|x| x[i]).collect::<Vec<f64>>();
        out.insert(
            (*name).to_owned(),
            json!({
                "mean": figure(&pick(0)),
                "p50": figure(&pick(1)),
                "p99": figure(&pick(2)),
                "runs": f.iter().map(|x| json!({"mean": x[0], "p50": x[1], "p99": x[2]})).collect::<Vec<_>>(),
            }),
        );
    }
    let means = |c: usize| -> Vec<f64> {
        figures
            .get(c)
            .map_or_else(Vec::new, |f| f.iter().map(|x| x[0]).collect())
    };
    let pool = means(names.len().saturating_sub(1));
    let over = |base: &[f64]| -> Value {
        let r: Vec<f64> = pool.iter().zip(base).map(|(p, b)| p / b).collect();
        figure(&r)
    };
    // The floor of each repeat: the faster of the two raw echoes (unpinned, either can land in
    // the slow mode of a cross-CPU wake-up for a whole repeat).
    let floor: Vec<f64> = means(0)
        .iter()
        .zip(&means(1))
        .map(|(a, b)| a.min(*b))
        .collect();
    out.insert("floor".to_owned(), json!({"mean": figure(&floor)}));
    let mut ratios = serde_json::Map::new();
    for (c, name) in names.iter().enumerate().take(names.len().saturating_sub(1)) {
        ratios.insert((*name).to_owned(), over(&means(c)));
    }
    ratios.insert("floor".to_owned(), over(&floor));
    (Value::Object(out), Value::Object(ratios))
}
