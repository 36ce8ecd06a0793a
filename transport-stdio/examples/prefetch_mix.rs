//! What `prefetch` / `prefetch_wait` trade under a mix of fast and slow calls: throughput
//! against the latency callers see, fast calls and slow calls apart.
//!
//! Workload: a 2-worker stdio pool (real Python), `--callers` tokio tasks (64) sharing
//! `--calls` calls (40,000); call `i` is slow when `i % slow_every == slow_every - 1` (every
//! 50th: a handler that busy-spins `--slow-ms`, 20 ms; `--sleep` makes it `time.sleep`), the
//! others are no-op calls (`noop(value=i)`, checked to return `i`). A second workload makes
//! `--fast-calls` (100,000) no-op calls only, for throughput. A caller's latency is the time
//! `pool.call` took, queueing included.
//!
//! Pool configurations (nothing else differs from the defaults):
//!
//! - `off`: `prefetch` 0, one call at a time per worker, callers wait in the pool's queue;
//! - `default`: `prefetch` 64 within `prefetch_wait` 1 ms (adaptive; the defaults);
//! - `fixed`: `prefetch` 64 within `prefetch_wait` 100 ms, in effect a fixed queue of 64;
//! - `shallow`: `prefetch` 4 within `prefetch_wait` 1 ms.
//!
//! Every run starts a fresh pool and makes 2,000 untimed no-op calls from all callers first.
//! Each round runs every configuration on the mixed workload, then every configuration on the
//! fast-only one, always in the same order (ABCD ABCD ...); figures are the median over
//! `--repeat` rounds (3) with their range. Percentiles are exact (sorted samples), so with 800
//! slow calls their p99.9 is the slowest one.
//!
//! Run: `cargo build --release -p transport-stdio --example prefetch_mix &&
//! PYPOOL_PYTHON=python3 target/release/examples/prefetch_mix [OPTIONS]`. Options: `--calls N`,
//! `--fast-calls N`, `--callers N`, `--slow-every N`, `--slow-ms N`, `--sleep`, `--repeat N`,
//! `--json` (one JSON object on stdout instead of Markdown tables).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_core::{Pool, PoolConfig, WorkerSpec};
use pool_testkit::bench;
use serde_json::{json, Value};
use transport_stdio::StdioLauncher;

const APP: &str = r#"import time
from pypool_worker import handler

@handler
def noop(value):
    return value

@handler
def slow(ms, spin):
    if spin:
        end = time.perf_counter() + ms / 1000.0
        while time.perf_counter() < end:
            pass
    else:
        time.sleep(ms / 1000.0)
    return ms
"#;

const WORKERS: usize = 2;
const WARM_UP: usize = 2000;

/// (name, prefetch, prefetch_wait)
const CONFIGS: [(&str, usize, Duration); 4] = [
    ("off", 0, Duration::from_millis(1)),
    ("default", 64, Duration::from_millis(1)),
    ("fixed", 64, Duration::from_millis(100)),
    ("shallow", 4, Duration::from_millis(1)),
];

struct Options {
    calls: usize,
    fast_calls: usize,
    callers: usize,
    slow_every: usize,
    slow_ms: u64,
    spin: bool,
    repeat: usize,
    json: bool,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        calls: 40_000,
        fast_calls: 100_000,
        callers: 64,
        slow_every: 50,
        slow_ms: 20,
        spin: true,
        repeat: 3,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || -> Result<usize, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{arg} takes a positive number"))
        };
        match arg.as_str() {
            "--calls" => o.calls = number()?,
            "--fast-calls" => o.fast_calls = number()?,
            "--callers" => o.callers = number()?,
            "--slow-every" => o.slow_every = number()?,
            "--slow-ms" => o.slow_ms = number()? as u64,
            "--repeat" => o.repeat = number()?,
            "--sleep" => o.spin = false,
            "--json" => o.json = true,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// Mean, p50, p99 and p99.9 of some latencies, in milliseconds (`None` if there are none).
fn latency(samples: &mut [Duration]) -> Option<[f64; 4]> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let total: Duration = samples.iter().sum();
    let at = |q: f64| {
        let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e3
    };
    Some([
        total.as_secs_f64() * 1e3 / samples.len() as f64,
        at(0.5),
        at(0.99),
        at(0.999),
    ])
}

/// One run's figures.
struct Run {
    throughput: f64,
    fast: Option<[f64; 4]>,
    slow: Option<[f64; 4]>,
}

/// `callers` tasks share `calls` calls; every `slow_every`th is slow (0: none). Returns the
/// wall time and the fast and slow calls' latencies.
async fn drive(
    pool: &Pool,
    calls: usize,
    callers: usize,
    slow_every: usize,
    slow_args: &Value,
) -> Result<(Duration, Vec<Duration>, Vec<Duration>), pool_core::Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (pool, next, slow_args) = (pool.clone(), next.clone(), slow_args.clone());
            tokio::spawn(async move {
                let (mut fast, mut slow) = (Vec::new(), Vec::new());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= calls {
                        return Ok::<_, pool_core::Error>((fast, slow));
                    }
                    let is_slow = slow_every > 0 && i % slow_every == slow_every - 1;
                    let t = Instant::now();
                    if is_slow {
                        let reply = pool.call("slow", slow_args.clone()).await?;
                        slow.push(t.elapsed());
                        assert_eq!(reply.value, slow_args["ms"], "slow call's reply");
                    } else {
                        let reply = pool.call("noop", json!({ "value": i })).await?;
                        fast.push(t.elapsed());
                        assert_eq!(reply.value.as_u64(), Some(i as u64), "no-op call's reply");
                    }
                }
            })
        })
        .collect();
    let (mut fast, mut slow) = (Vec::with_capacity(calls), Vec::new());
    for task in tasks {
        let (f, s) = task.await.expect("a caller does not panic")?;
        fast.extend(f);
        slow.extend(s);
    }
    Ok((started.elapsed(), fast, slow))
}

async fn run(
    o: &Options,
    app: &str,
    launcher: Arc<StdioLauncher>,
    (prefetch, wait): (usize, Duration),
    mixed: bool,
) -> Result<Run, Box<dyn std::error::Error>> {
    let config = PoolConfig::new(app)
        .size(WORKERS)
        .prefetch(prefetch)
        .prefetch_wait(wait);
    let pool = Pool::start(config, launcher).await?;
    let slow_args = json!({"ms": o.slow_ms, "spin": o.spin});
    drive(&pool, WARM_UP, o.callers, 0, &slow_args).await?;
    let (calls, slow_every) = if mixed {
        (o.calls, o.slow_every)
    } else {
        (o.fast_calls, 0)
    };
    let result = drive(&pool, calls, o.callers, slow_every, &slow_args).await;
    pool.shutdown(Duration::from_secs(5)).await;
    let (took, mut fast, mut slow) = result?;
    Ok(Run {
        throughput: calls as f64 / took.as_secs_f64(),
        fast: latency(&mut fast),
        slow: latency(&mut slow),
    })
}

/// The figures of one configuration over the rounds.
fn summary(name: &str, (prefetch, wait): (usize, Duration), runs: &[Run]) -> Value {
    let stats = |pick: fn(&Run) -> Option<[f64; 4]>| {
        let v: Vec<[f64; 4]> = runs.iter().filter_map(pick).collect();
        if v.is_empty() {
            return Value::Null;
        }
        let col = |i: usize| bench::figure(&v.iter().map(|x| x[i]).collect::<Vec<_>>());
        json!({"mean": col(0), "p50": col(1), "p99": col(2), "p99_9": col(3)})
    };
    let per_run = |x: Option<[f64; 4]>| {
        x.map(
            |[mean, p50, p99, p99_9]| json!({"mean": mean, "p50": p50, "p99": p99, "p99_9": p99_9}),
        )
    };
    json!({
        "config": name,
        "prefetch": prefetch,
        "prefetch_wait_ms": wait.as_secs_f64() * 1e3,
        "throughput_per_s": bench::figure(&runs.iter().map(|r| r.throughput).collect::<Vec<_>>()),
        "fast_ms": stats(|r| r.fast),
        "slow_ms": stats(|r| r.slow),
        "runs": runs.iter().map(|r| json!({
            "throughput_per_s": r.throughput,
            "fast_ms": per_run(r.fast),
            "slow_ms": per_run(r.slow),
        })).collect::<Vec<_>>(),
    })
}

fn fmt(f: &Value, digits: usize) -> String {
    if f.is_null() {
        return "—".to_owned();
    }
    let g = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "{:.d$} ({:.d$}–{:.d$})",
        g("median"),
        g("min"),
        g("max"),
        d = digits
    )
}

fn label(c: &Value) -> String {
    format!(
        "{}: prefetch {}, wait {} ms",
        c["config"].as_str().unwrap_or("?"),
        c["prefetch"],
        c["prefetch_wait_ms"]
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = options()?;
    let app_dir = tempfile::tempdir()?;
    let app_path = app_dir.path().join("prefetch_mix_app.py");
    std::fs::write(&app_path, APP)?;
    let app = app_path.to_string_lossy().into_owned();
    let launcher = Arc::new(StdioLauncher::new());
    let python = launcher
        .processes()
        .interpreter(&WorkerSpec::new("bench", "probe", app.clone()))
        .await?
        .executable;

    let mut mixed: Vec<Vec<Run>> = CONFIGS.iter().map(|_| Vec::new()).collect();
    let mut fast_only: Vec<Vec<Run>> = CONFIGS.iter().map(|_| Vec::new()).collect();
    let started = Instant::now();
    for round in 0..o.repeat {
        for (k, &(name, prefetch, wait)) in CONFIGS.iter().enumerate() {
            let r = run(&o, &app, launcher.clone(), (prefetch, wait), true).await?;
            eprintln!(
                "round {} mixed {name}: {:.0} calls/s, fast p99 {:.2} ms",
                round + 1,
                r.throughput,
                r.fast.map_or(f64::NAN, |f| f[2])
            );
            mixed[k].push(r);
        }
        for (k, &(name, prefetch, wait)) in CONFIGS.iter().enumerate() {
            let r = run(&o, &app, launcher.clone(), (prefetch, wait), false).await?;
            eprintln!(
                "round {} fast-only {name}: {:.0} calls/s",
                round + 1,
                r.throughput
            );
            fast_only[k].push(r);
        }
    }
    let summarise = |runs: &[Vec<Run>]| -> Vec<Value> {
        CONFIGS
            .iter()
            .zip(runs)
            .map(|(&(name, p, w), r)| summary(name, (p, w), r))
            .collect()
    };
    let report = json!({
        "transport": "stdio",
        "workers": WORKERS,
        "callers": o.callers,
        "calls": o.calls,
        "fast_calls": o.fast_calls,
        "slow_every": o.slow_every,
        "slow_ms": o.slow_ms,
        "slow_kind": if o.spin { "spin" } else { "sleep" },
        "warm_up": WARM_UP,
        "repeat": o.repeat,
        "python": python.display().to_string(),
        "cpus_allowed": bench::cpus_allowed(),
        "seconds": started.elapsed().as_secs_f64(),
        "mixed": summarise(&mixed),
        "fast_only": summarise(&fast_only),
    });
    if o.json {
        println!("{report}");
        return Ok(());
    }

    println!(
        "stdio, {} workers, {} callers, interpreter {}, CPUs allowed: {}; {} rounds (ABCD order), {:.0} s in all. Median of the rounds (min–max).",
        WORKERS,
        o.callers,
        python.display(),
        report["cpus_allowed"].as_str().unwrap_or("?"),
        o.repeat,
        started.elapsed().as_secs_f64()
    );
    println!();
    println!(
        "Mixed: {} calls, every {}th a {} ms {} call, the rest no-op. Latency in ms, as callers see it (queueing included).",
        o.calls,
        o.slow_every,
        o.slow_ms,
        if o.spin { "busy-spinning" } else { "sleeping" }
    );
    println!();
    println!("| config | calls/s | fast mean | fast p50 | fast p99 | fast p99.9 | slow mean | slow p50 | slow p99 | slow p99.9 |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for c in report["mixed"].as_array().into_iter().flatten() {
        let (f, s) = (&c["fast_ms"], &c["slow_ms"]);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            label(c),
            fmt(&c["throughput_per_s"], 0),
            fmt(&f["mean"], 2),
            fmt(&f["p50"], 2),
            fmt(&f["p99"], 2),
            fmt(&f["p99_9"], 2),
            fmt(&s["mean"], 1),
            fmt(&s["p50"], 1),
            fmt(&s["p99"], 1),
            fmt(&s["p99_9"], 1),
        );
    }
    println!();
    println!("Fast only: {} no-op calls. Latency in ms.", o.fast_calls);
    println!();
    println!("| config | calls/s | mean | p50 | p99 | p99.9 |");
    println!("|---|---|---|---|---|---|");
    for c in report["fast_only"].as_array().into_iter().flatten() {
        let f = &c["fast_ms"];
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            label(c),
            fmt(&c["throughput_per_s"], 0),
            fmt(&f["mean"], 3),
            fmt(&f["p50"], 3),
            fmt(&f["p99"], 3),
            fmt(&f["p99_9"], 3),
        );
    }
    Ok(())
}
