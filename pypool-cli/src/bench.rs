//! `pypool bench`: start-up, throughput and latency of a pool, optionally against baselines.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pypool::{Payload, Pool, PoolConfig};
use serde::Serialize;
use serde_json::json;

use crate::assets::{Assets, DEMO_HANDLERS, PYTHON_POOLS, RAW_ECHO};
use crate::baseline::{self, Baselines};
use crate::measure::{drive, Latency, Measurement};
use crate::ui::{
    fmt_bytes, fmt_count, fmt_duration, fmt_rate, fmt_ratio, fmt_us, table, Failure, Ui,
};
use crate::{BenchArgs, Global};

/// The workload, as given on the command line.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub workers: usize,
    pub concurrency: usize,
    pub calls: u64,
    pub payload: usize,
}

/// What `pypool bench --json` prints.
#[derive(Debug, Serialize)]
struct Report {
    transport: String,
    workers: usize,
    concurrency: usize,
    calls: u64,
    payload_bytes: usize,
    errors: u64,
    startup_ms: f64,
    duration_ms: f64,
    throughput_per_s: f64,
    latency_us: Latency,
    python: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    baselines: Option<Baselines>,
}

pub async fn run(global: &Global, args: BenchArgs) -> Result<ExitCode, Failure> {
    let ui = Ui::new(global);
    let workload = Workload {
        workers: usize::from(args.workers),
        concurrency: args.concurrency as usize,
        calls: args.calls,
        payload: args.payload as usize,
    };
    if args.baseline && !matches!(args.transport.as_str(), "stdio" | "ipc") {
        return Err(Failure::usage(format!(
            "--baseline compares against the raw channel of a process transport and Python's pools; run it with --transport stdio or ipc (not {})",
            args.transport
        )));
    }
    let assets = Assets::write(&[DEMO_HANDLERS, RAW_ECHO, PYTHON_POOLS])?;
    let launcher = pypool::launcher(&args.transport)?;
    let app = assets.path(DEMO_HANDLERS.0);

    let (pypool, python) =
        bench_pool(&ui, global, &args.transport, launcher, &app, workload).await?;
    let baselines = if args.baseline {
        Some(baseline::run_all(&ui, global, &args.transport, &assets, workload, &pypool).await?)
    } else {
        None
    };

    let report = Report {
        transport: args.transport.clone(),
        workers: workload.workers,
        concurrency: workload.concurrency,
        calls: pypool.calls,
        payload_bytes: workload.payload,
        errors: pypool.errors,
        startup_ms: pypool.startup_ms,
        duration_ms: pypool.duration_ms,
        throughput_per_s: pypool.throughput_per_s,
        latency_us: pypool.latency_us.clone(),
        python,
        first_error: pypool.first_error.clone(),
        baselines,
    };
    if ui.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| Failure::failed(e.to_string()))?
        );
    } else {
        print_human(&report, workload);
    }
    if report.errors > 0 {
        return Err(Failure::failed(format!(
            "{} of {} calls failed; first error: {}",
            report.errors,
            report.calls,
            report.first_error.as_deref().unwrap_or("unknown")
        ))
        .json_printed());
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts the pool, runs the workload on it, shuts it down.
async fn bench_pool(
    ui: &Ui,
    global: &Global,
    transport: &str,
    launcher: Arc<dyn pypool::Launcher>,
    app: &std::path::Path,
    w: Workload,
) -> Result<(Measurement, Option<String>), Failure> {
    let config = PoolConfig::new(app.to_string_lossy())
        .name("bench")
        .size(w.workers)
        .python(&global.python)
        .max_waiters(w.concurrency.max(10_000));
    let spinner = ui.spinner(format!(
        "pypool ({transport}): starting {} workers",
        w.workers
    ));
    let t0 = Instant::now();
    let pool = Pool::start(config, launcher).await;
    spinner.finish_and_clear();
    let pool = pool?;
    let startup = t0.elapsed();
    let python = pool.status().workers.first().map(|w| w.python.clone());

    let data = Bytes::from(vec![b'x'; w.payload]);
    let expected = w.payload;
    let bar = ui.bar(w.calls, format!("pypool ({transport})"));
    let caller_pool = pool.clone();
    let driven = drive(w.concurrency, w.calls, &bar, move |_| {
        let pool = caller_pool.clone();
        let data = data.clone();
        async move {
            let mut args = Payload::default();
            let placeholder = args.attach(data);
            args.value = json!({ "value": placeholder });
            match pool.call("echo", args).await {
                Ok(reply) => match reply.as_bytes() {
                    Some(bytes) if bytes.len() == expected => Ok(()),
                    Some(bytes) => Err(format!(
                        "echo returned {} bytes instead of {expected}",
                        bytes.len()
                    )),
                    None => Err(format!("echo returned {} instead of bytes", reply.value)),
                },
                Err(err) => Err(err.to_string()),
            }
        }
    })
    .await;
    bar.finish_and_clear();
    let spinner = ui.spinner("pypool: shutting down");
    pool.shutdown(Duration::from_secs(5)).await;
    spinner.finish_and_clear();
    Ok((driven.measurement(startup), python))
}

fn print_human(report: &Report, w: Workload) {
    println!(
        "pypool bench: transport {}, {} workers, {} concurrent callers, {} calls, {} payload{}",
        report.transport,
        w.workers,
        w.concurrency,
        fmt_count(w.calls),
        fmt_bytes(w.payload as u64),
        report
            .python
            .as_deref()
            .map(|v| format!(", Python {v}"))
            .unwrap_or_default()
    );
    println!();
    let row = |name: &str, m: &Measurement, ratios: [String; 3]| {
        let [throughput, p50, p99] = ratios;
        vec![
            name.to_owned(),
            fmt_us(m.startup_ms * 1e3),
            fmt_rate(m.throughput_per_s),
            fmt_us(m.latency_us.mean),
            fmt_us(m.latency_us.p50 as f64),
            fmt_us(m.latency_us.p99 as f64),
            fmt_us(m.latency_us.p999 as f64),
            fmt_count(m.errors),
            throughput,
            p50,
            p99,
        ]
    };
    let pypool = Measurement {
        startup_ms: report.startup_ms,
        duration_ms: report.duration_ms,
        calls: report.calls,
        errors: report.errors,
        throughput_per_s: report.throughput_per_s,
        latency_us: report.latency_us.clone(),
        first_error: None,
    };
    let dash = || ["—".to_owned(), "—".to_owned(), "—".to_owned()];
    let mut rows = vec![row(
        &format!("pypool ({})", report.transport),
        &pypool,
        dash(),
    )];
    if let Some(b) = &report.baselines {
        for (name, compared) in b.named() {
            let r = &compared.pypool_ratio;
            rows.push(row(
                name,
                &compared.measurement,
                [fmt_ratio(r.throughput), fmt_ratio(r.p50), fmt_ratio(r.p99)],
            ));
        }
    }
    let headers: &[&str] = if report.baselines.is_some() {
        &[
            "",
            "start-up",
            "throughput",
            "mean",
            "p50",
            "p99",
            "p99.9",
            "errors",
            "pypool ÷ this: throughput",
            "p50",
            "p99",
        ]
    } else {
        &[
            "",
            "start-up",
            "throughput",
            "mean",
            "p50",
            "p99",
            "p99.9",
            "errors",
        ]
    };
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|mut r| {
            r.truncate(headers.len());
            r
        })
        .collect();
    print!("{}", table(headers, &rows, 0));
    println!();
    println!(
        "start-up: until every worker is ready; latency: per call as the caller sees it, queueing included ({} timed calls in {}).",
        fmt_count(report.calls),
        fmt_duration(Duration::from_secs_f64(report.duration_ms / 1e3))
    );
    if report.baselines.is_some() {
        println!(
            "pypool ÷ this: above 1 for throughput, below 1 for latency means pypool is faster."
        );
        println!("raw floor: Python echoing length-prefixed frames over the same kind of channel (pipes for stdio, a Unix socket for ipc), driven from Rust with no protocol and no pool.");
    }
}
