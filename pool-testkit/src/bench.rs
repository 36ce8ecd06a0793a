//! Pieces the transport benches share: the bench app, latency histograms, the pool side of a
//! round-trip measurement, and a raw frame of the size the pool sends, for the floor.

use std::future::Future;
use std::path::Path;
use std::time::Instant;

use hdrhistogram::Histogram;
use pool_core::protocol::{encode, Codec, Message};
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

/// Times `rounds` sequential runs of `round_trip` after `warm_up` untimed ones.
pub async fn time_round_trips<F, Fut, E>(
    warm_up: usize,
    rounds: usize,
    mut round_trip: F,
) -> Result<Histogram<u64>, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    for _ in 0..warm_up {
        round_trip().await?;
    }
    let mut h = histogram();
    for _ in 0..rounds {
        let t = Instant::now();
        round_trip().await?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    Ok(h)
}

/// Sequential no-op `echo` calls through `pool`: 200 warm-up calls, then `rounds` timed ones.
pub async fn time_pool_calls(
    pool: &Pool,
    rounds: usize,
) -> Result<Histogram<u64>, pool_core::Error> {
    time_round_trips(200, rounds, || async {
        pool.call("echo", noop_args()).await.map(drop)
    })
    .await
}

/// A length-prefixed frame as large as the pool's CALL of [`noop_args`], for the raw floor.
pub fn call_sized_frame() -> Vec<u8> {
    let call = Message::Call {
        id: 1_000_000,
        command: "echo".into(),
        args: noop_args(),
        session: None,
        timeout_ms: Some(60_000),
        window: Some(16),
        batch: false,
        scalars: false,
    };
    // Encoding a constant message cannot fail.
    let body = encode(&call, Codec::Json, &[]).expect("constant message encodes");
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// A Markdown table row: mean, p50, p99 in µs, and the mean as a ratio of `base`'s.
pub fn latency_row(name: &str, h: &Histogram<u64>, base: &Histogram<u64>) -> String {
    format!(
        "| {name} | {:.1} | {} | {} | {:.2} |",
        h.mean(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.mean() / base.mean()
    )
}

/// The floor: `rounds` sequential ping-pongs of `frame` with a raw echo on `writer`/`reader`,
/// after 200 untimed ones.
pub async fn time_raw_echo<W, R>(
    writer: &mut W,
    reader: &mut R,
    frame: &[u8],
    rounds: usize,
) -> std::io::Result<Histogram<u64>>
where
    W: tokio::io::AsyncWrite + Unpin,
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut back = vec![0u8; frame.len()];
    let mut h = histogram();
    for round in 0..200 + rounds {
        let t = Instant::now();
        writer.write_all(frame).await?;
        reader.read_exact(&mut back).await?;
        if round >= 200 {
            h.saturating_record(t.elapsed().as_micros() as u64);
        }
    }
    Ok(h)
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
