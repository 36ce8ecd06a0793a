//! `pypool demo`: a pool on the bundled demo handlers, a mixed workload, and a report.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pypool::{Affinity, Payload, Pool, PoolConfig, PoolStats, PoolStatus};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::assets::{Assets, DEMO_HANDLERS};
use crate::measure::ms;
use crate::ui::{
    error_json, fmt_bytes, fmt_count, fmt_duration, fmt_rate, fmt_us, table, Failure, Ui,
};
use crate::{DemoArgs, Global};

/// Sessions, each its own caller, each keeping state in its worker.
const SESSIONS: usize = 4;
/// remember + recall rounds per session.
const SESSION_ROUNDS: u64 = 10;
/// Callers without a session.
const ANONYMOUS_CALLERS: usize = 6;
/// Calls per anonymous caller (alternately `add` and a 1 KiB `echo`).
const ANONYMOUS_CALLS: u64 = 20;
/// How long the slow call occupies its worker.
const SLOW_SECONDS: f64 = 1.0;
/// Size of the binary attachment the anonymous callers echo.
const ECHO_BYTES: usize = 1024;

/// What one caller saw.
#[derive(Default)]
struct CallerOutcome {
    calls: u64,
    ok: u64,
    /// Anything that should not have happened.
    problems: Vec<String>,
    slow_call: Option<Duration>,
    failing_call: Option<pypool::Error>,
}

impl CallerOutcome {
    fn record(&mut self, what: &str, result: &Result<Payload, pypool::Error>) {
        self.calls += 1;
        match result {
            Ok(_) => self.ok += 1,
            Err(err) => self.problems.push(format!("{what}: {err}")),
        }
    }
}

#[derive(Debug, Serialize)]
struct WorkloadReport {
    callers: usize,
    calls: u64,
    ok: u64,
    failed: u64,
    duration_ms: f64,
    throughput_per_s: f64,
    sessions: usize,
    session_calls: u64,
    anonymous_calls: u64,
    slow_call_ms: Option<f64>,
    session_state_consistent: bool,
    problems: Vec<String>,
}

#[derive(Debug, Serialize)]
struct FailingCall {
    command: &'static str,
    error: Value,
}

/// What `pypool demo --json` prints.
#[derive(Debug, Serialize)]
struct DemoReport {
    transport: String,
    workers: usize,
    python: Option<String>,
    startup_ms: f64,
    workload: WorkloadReport,
    failing_call: Option<FailingCall>,
    status: PoolStatus,
    stats: PoolStats,
    shutdown_ms: f64,
    /// Worker processes still running after the shutdown (`null` for transports without
    /// processes of their own).
    processes_left: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_url: Option<String>,
}

pub async fn run(global: &Global, args: DemoArgs) -> Result<ExitCode, Failure> {
    let ui = Ui::new(global);
    #[cfg(not(feature = "metrics"))]
    if args.metrics_addr.is_some() || args.hold {
        return Err(Failure::usage(
            "--metrics-addr needs a pypool built with the `metrics` feature: \
             `cargo install pypool-cli --features metrics`, or \
             `cargo run --release -p pypool-cli --features metrics -- demo --metrics-addr ADDR`",
        ));
    }
    let workers = usize::from(args.workers);
    let assets = Assets::write(&[DEMO_HANDLERS])?;
    let launcher = pypool::launcher(&args.transport)?;

    #[cfg(feature = "metrics")]
    let endpoint = match args.metrics_addr {
        Some(addr) => {
            let endpoint = pypool::metrics::serve_prometheus(addr)
                .await
                .map_err(|err| Failure::failed(format!("cannot serve metrics at {addr}: {err}")))?;
            eprintln!("pypool: serving metrics at {}", endpoint.url());
            Some(endpoint)
        }
        None => None,
    };
    #[cfg(feature = "metrics")]
    let metrics_url = endpoint.as_ref().map(|e| e.url());
    #[cfg(not(feature = "metrics"))]
    let metrics_url: Option<String> = None;

    let config = PoolConfig::new(assets.path(DEMO_HANDLERS.0).to_string_lossy())
        .name("demo")
        .size(workers)
        .python(&global.python);
    let spinner = ui.spinner(format!(
        "starting {workers} workers concurrently ({})",
        args.transport
    ));
    let t0 = Instant::now();
    let pool = Pool::start(config, launcher).await;
    spinner.finish_and_clear();
    let pool = pool?;
    let startup = t0.elapsed();

    #[cfg(feature = "metrics")]
    let exporter = endpoint
        .as_ref()
        .map(|_| pypool::metrics::MetricsExporter::spawn(&pool, Duration::from_millis(500)));

    let (outcomes, took) = workload(&ui, &pool).await;
    let status = pool.status();
    let stats = pool.stats();

    #[cfg(feature = "metrics")]
    if args.hold {
        pypool::metrics::record(&pool);
        eprintln!(
            "pypool: workload done; metrics stay up at {} until standard input closes (or Ctrl-C)",
            metrics_url.as_deref().unwrap_or_default()
        );
        hold().await;
    }
    #[cfg(feature = "metrics")]
    if let Some(exporter) = exporter {
        exporter.stop().await;
    }

    for i in 0..SESSIONS {
        pool.session(session_id(i)).end().await;
    }
    let pids: Vec<u32> = status.workers.iter().filter_map(|w| w.pid).collect();
    let spinner = ui.spinner("shutting down");
    let t0 = Instant::now();
    pool.shutdown(Duration::from_secs(5)).await;
    let shutdown = t0.elapsed();
    spinner.finish_and_clear();
    let processes_left =
        (args.transport != "fake").then(|| pids.iter().filter(|pid| alive(**pid)).count());

    let report = report(
        &args.transport,
        workers,
        startup,
        outcomes,
        took,
        status,
        stats,
        shutdown,
        processes_left,
        metrics_url,
    );
    if ui.json {
        let text = serde_json::to_string(&report).map_err(|e| Failure::failed(e.to_string()))?;
        println!("{text}");
    } else {
        print_human(&report);
    }
    let mut problems = report.workload.problems.clone();
    if report.failing_call.is_none() {
        problems.push("the failing call did not fail".to_owned());
    }
    if let Some(left) = report.processes_left.filter(|n| *n > 0) {
        problems.push(format!("{left} worker processes still run after shutdown"));
    }
    if problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(Failure::failed(format!(
            "the demo did not go as expected:\n  {}",
            problems.join("\n  ")
        ))
        .json_printed())
    }
}

fn session_id(i: usize) -> String {
    format!("user-{}", i + 1)
}

/// 12 concurrent callers: sessions, anonymous calls, a slow call and a failing call.
async fn workload(ui: &Ui, pool: &Pool) -> (Vec<CallerOutcome>, Duration) {
    let total =
        SESSIONS as u64 * SESSION_ROUNDS * 2 + ANONYMOUS_CALLERS as u64 * ANONYMOUS_CALLS + 2;
    let bar = ui.bar(
        total,
        format!("{} concurrent callers", SESSIONS + ANONYMOUS_CALLERS + 2),
    );
    let started = Instant::now();
    let mut callers = JoinSet::new();
    for i in 0..SESSIONS {
        let session = pool.session_with(session_id(i), Affinity::Strict);
        let bar = bar.clone();
        callers.spawn(async move {
            let mut outcome = CallerOutcome::default();
            for round in 0..SESSION_ROUNDS {
                let key = format!("item-{round}");
                let value = json!((i as u64 + 1) * 100 + round);
                let stored = session
                    .call("remember", json!({"key": key, "value": value}))
                    .await;
                outcome.record("remember", &stored);
                let recalled = session.call("recall", json!({"key": key})).await;
                outcome.record("recall", &recalled);
                if let Ok(reply) = &recalled {
                    if reply.value != value {
                        outcome.problems.push(format!(
                            "session {}: recall({key}) returned {} instead of {value}",
                            session.id(),
                            reply.value
                        ));
                    }
                }
                bar.inc(2);
            }
            outcome
        });
    }
    for c in 0..ANONYMOUS_CALLERS {
        let pool = pool.clone();
        let bar = bar.clone();
        callers.spawn(async move {
            let mut outcome = CallerOutcome::default();
            let blob = Bytes::from(vec![c as u8; ECHO_BYTES]);
            for n in 0..ANONYMOUS_CALLS {
                if n % 2 == 0 {
                    let (a, b) = (c as u64, n);
                    let sum = pool.call("add", json!({"a": a, "b": b})).await;
                    outcome.record("add", &sum);
                    if let Ok(reply) = &sum {
                        if reply.value != json!(a + b) {
                            outcome
                                .problems
                                .push(format!("add({a}, {b}) returned {}", reply.value));
                        }
                    }
                } else {
                    let mut args = Payload::default();
                    let placeholder = args.attach(blob.clone());
                    args.value = json!({ "value": placeholder });
                    let echoed = pool.call("echo", args).await;
                    outcome.record("echo", &echoed);
                    if let Ok(reply) = &echoed {
                        if reply.as_bytes() != Some(&blob) {
                            outcome
                                .problems
                                .push("echo returned different bytes".to_owned());
                        }
                    }
                }
                bar.inc(1);
            }
            outcome
        });
    }
    {
        let pool = pool.clone();
        let bar = bar.clone();
        callers.spawn(async move {
            let mut outcome = CallerOutcome::default();
            let t0 = Instant::now();
            let slow = pool.call("sleep", json!({"seconds": SLOW_SECONDS})).await;
            outcome.slow_call = Some(t0.elapsed());
            outcome.record("sleep", &slow);
            bar.inc(1);
            outcome
        });
    }
    {
        let pool = pool.clone();
        let bar = bar.clone();
        callers.spawn(async move {
            let mut outcome = CallerOutcome {
                calls: 1,
                ..CallerOutcome::default()
            };
            match pool
                .call("fail", json!({"message": "blue widget, order 42"}))
                .await
            {
                Ok(reply) => outcome
                    .problems
                    .push(format!("the failing call returned {}", reply.value)),
                Err(err) => outcome.failing_call = Some(err),
            }
            bar.inc(1);
            outcome
        });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = callers.join_next().await {
        match joined {
            Ok(outcome) => outcomes.push(outcome),
            Err(err) => outcomes.push(CallerOutcome {
                problems: vec![format!("a caller task failed: {err}")],
                ..CallerOutcome::default()
            }),
        }
    }
    let took = started.elapsed();
    bar.finish_and_clear();
    (outcomes, took)
}

#[cfg(feature = "metrics")]
async fn hold() {
    use tokio::io::AsyncReadExt;
    let until_eof = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = until_eof => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Whether a process with this id still exists.
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[allow(clippy::too_many_arguments)]
fn report(
    transport: &str,
    workers: usize,
    startup: Duration,
    outcomes: Vec<CallerOutcome>,
    took: Duration,
    status: PoolStatus,
    stats: PoolStats,
    shutdown: Duration,
    processes_left: Option<usize>,
    metrics_url: Option<String>,
) -> DemoReport {
    let calls: u64 = outcomes.iter().map(|o| o.calls).sum();
    let ok: u64 = outcomes.iter().map(|o| o.ok).sum();
    let problems: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.problems.iter().cloned())
        .collect();
    let session_state_consistent = !problems.iter().any(|p| p.starts_with("session "));
    let slow_call = outcomes.iter().find_map(|o| o.slow_call);
    let failing_call = outcomes
        .iter()
        .find_map(|o| o.failing_call.as_ref())
        .map(|err| FailingCall {
            command: "fail",
            error: error_json(err),
        });
    DemoReport {
        transport: transport.to_owned(),
        workers,
        python: status.workers.first().map(|w| w.python.clone()),
        startup_ms: ms(startup),
        workload: WorkloadReport {
            callers: SESSIONS + ANONYMOUS_CALLERS + 2,
            calls,
            ok,
            failed: calls - ok,
            duration_ms: ms(took),
            throughput_per_s: (calls as f64 / took.as_secs_f64().max(1e-9) * 10.0).round() / 10.0,
            sessions: SESSIONS,
            session_calls: SESSIONS as u64 * SESSION_ROUNDS * 2,
            anonymous_calls: ANONYMOUS_CALLERS as u64 * ANONYMOUS_CALLS,
            slow_call_ms: slow_call.map(ms),
            session_state_consistent,
            problems,
        },
        failing_call,
        status,
        stats,
        shutdown_ms: ms(shutdown),
        processes_left,
        metrics_url,
    }
}

fn print_human(r: &DemoReport) {
    let w = &r.workload;
    println!(
        "pypool demo: {} workers over {}{}",
        r.workers,
        r.transport,
        r.python
            .as_deref()
            .map(|v| format!(", Python {v}"))
            .unwrap_or_default()
    );
    println!();
    println!(
        "start-up    {} workers ready in {} (launched concurrently; ready = handshake done)",
        r.workers,
        fmt_us(r.startup_ms * 1e3)
    );
    println!(
        "workload    {} concurrent callers made {} calls in {} ({}): {} ok, {} failed",
        w.callers,
        w.calls,
        fmt_us(w.duration_ms * 1e3),
        fmt_rate(w.throughput_per_s),
        w.ok,
        w.failed
    );
    println!(
        "            {} sessions with strict affinity, {} calls: {}",
        w.sessions,
        w.session_calls,
        if w.session_state_consistent {
            "every recall found what its session remembered"
        } else {
            "SESSION STATE WAS LOST (see problems)"
        }
    );
    println!(
        "            {} anonymous calls (add, {} echo of raw bytes)",
        w.anonymous_calls,
        fmt_bytes(ECHO_BYTES as u64)
    );
    if let Some(slow) = w.slow_call_ms {
        println!(
            "            1 slow call took {} while the other callers were served",
            fmt_us(slow * 1e3)
        );
    }
    println!("            1 failing call: the handler raised (below); its worker lives on");
    if let Some(url) = &r.metrics_url {
        println!("metrics     served at {url}");
    }

    println!();
    println!("workers (pool.status())");
    let rows: Vec<Vec<String>> = r
        .status
        .workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.pid.map(|p| p.to_string()).unwrap_or_else(|| "—".into()),
                format!("{:?}", w.state).to_lowercase(),
                w.calls.to_string(),
                format!("{}/{}", w.in_flight, w.max_in_flight),
                fmt_duration(Duration::from_millis(w.age_ms)),
                w.rss_bytes.map(fmt_bytes).unwrap_or_else(|| "—".into()),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["id", "pid", "state", "calls", "in flight", "age", "rss"],
            &rows,
            2
        )
    );

    println!();
    println!("sessions (pool.status())");
    let rows: Vec<Vec<String>> = r
        .status
        .sessions
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                format!("{:?}", s.affinity).to_lowercase(),
                s.calls.to_string(),
                s.errors.to_string(),
                s.last_worker.clone().unwrap_or_else(|| "—".into()),
                fmt_duration(Duration::from_millis(s.age_ms)),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["id", "affinity", "calls", "errors", "worker", "age"],
            &rows,
            2
        )
    );

    println!();
    println!("latency (pool.stats())");
    let row = |name: &str, l: &pypool::LatencySummary| {
        vec![
            name.to_owned(),
            fmt_count(l.count),
            fmt_us(l.mean_us),
            fmt_us(l.p50_us as f64),
            fmt_us(l.p90_us as f64),
            fmt_us(l.p99_us as f64),
            fmt_us(l.p999_us as f64),
            fmt_us(l.max_us as f64),
        ]
    };
    print!(
        "{}",
        table(
            &["", "count", "mean", "p50", "p90", "p99", "p99.9", "max"],
            &[
                row("queue wait", &r.stats.queue_wait),
                row("call", &r.stats.call_time),
            ],
            2
        )
    );
    println!("  queue wait: until a worker was free; call: from sending to the final reply, successful calls");
    let c = &r.stats.counters;
    println!(
        "  counters: {} ok, {} failed ({} handler errors), {} checkout timeouts, {} call timeouts, {} crashes, {} launches",
        c.calls_ok, c.calls_failed, c.handler_errors, c.checkout_timeouts, c.call_timeouts, c.crashes, c.launches
    );

    println!();
    match &r.failing_call {
        Some(failing) => {
            let e = &failing.error;
            let text = |key: &str| e.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
            println!(
                "the failing call: `{}` raised (structured error)",
                failing.command
            );
            println!("  type       {}", text("type"));
            println!("  message    {}", text("message"));
            if let Some(worker) = e.get("worker").and_then(Value::as_str) {
                println!("  worker     {worker}");
            }
            match e.get("traceback").and_then(Value::as_str) {
                Some(tb) => {
                    println!("  traceback");
                    for line in tb.trim_end().lines() {
                        println!("    {line}");
                    }
                }
                None => println!("  traceback  (none sent)"),
            }
        }
        None => println!("the failing call did not fail"),
    }

    println!();
    println!(
        "shutdown    {} workers stopped in {}{}",
        r.workers,
        fmt_us(r.shutdown_ms * 1e3),
        match r.processes_left {
            Some(0) => "; no worker process left".to_owned(),
            Some(n) => format!("; {n} WORKER PROCESSES STILL RUNNING"),
            None => String::new(),
        }
    );
    if !w.problems.is_empty() {
        println!();
        println!("problems");
        for p in &w.problems {
            println!("  {p}");
        }
    }
}
