//! `pypool bench`: start-up, throughput and latency of a pool, optionally against baselines.
//!
//! A bench is `repeat` rounds; each round runs pypool and then every baseline once, back to
//! back (each round starting from the next contender, so none is always first), each with a
//! fresh pool. Figures are medians over the rounds with their range; a comparison is made
//! within each round and summarised the same way.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use pypool::{MapOptions, Payload, Pool, PoolConfig};
use serde::Serialize;
use serde_json::json;

use crate::assets::{Assets, DEMO_HANDLERS, PYTHON_POOLS, RAW_ECHO};
use crate::baseline::{self, Baseline, Baselines, Compared};
use crate::measure::{drive, Driven, Figure, Measurement, Range, Speedup, Summary, Workload};
use crate::ui::{
    fmt_bytes, fmt_count, fmt_rate, fmt_rate_range, fmt_speedup, fmt_us, table, wrap, Failure, Ui,
    MAX_WIDTH,
};
use crate::{BenchArgs, Global};

/// How the bench drives the pool. Each mode is one function that runs the workload on a started
/// pool ([`drive_pool`]); a mode that drives the pool differently (e.g. `Pool::map`) is one more
/// variant and one more function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// CONCURRENCY callers, each making one `pool.call` at a time.
    Call,
    /// One `pool.map` over all the calls (results in input order).
    Map,
    /// One `pool.map_unordered` over all the calls (results as they complete).
    MapUnordered,
}

impl Mode {
    /// The mode the command line asks for.
    pub fn of(args: &BenchArgs) -> Mode {
        args.mode
    }

    /// Its name in the tables: `pypool <name> (<transport>)`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Call => "call",
            Mode::Map => "map",
            Mode::MapUnordered => "map_unordered",
        }
    }
}

/// What `pypool bench --json` prints: pypool's own figures (medians over the runs) at the top
/// level, beside the workload.
#[derive(Debug, Serialize)]
struct Report {
    transport: String,
    mode: Mode,
    workers: usize,
    concurrency: usize,
    payload_bytes: usize,
    /// The pool's `prefetch` setting (the pool's default unless `--prefetch` was given).
    prefetch: usize,
    /// The pool's `prefetch_wait` in milliseconds (its default unless `--prefetch-wait`).
    prefetch_wait_ms: f64,
    /// Rounds run; every figure is the median over them.
    repeat: u32,
    python: Option<String>,
    #[serde(flatten)]
    pypool: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    baselines: Option<Baselines>,
}

pub async fn run(global: &Global, args: BenchArgs) -> Result<ExitCode, Failure> {
    let ui = Ui::new(global);
    let workers = match args.workers {
        Some(n) => usize::from(n),
        None => std::thread::available_parallelism().map_or(2, usize::from),
    };
    let workload = Workload {
        workers,
        concurrency: args.concurrency as usize,
        calls: args.calls,
        payload: args.payload as usize,
        chunksize: args.chunksize,
    };
    let mode = Mode::of(&args);
    if args.baseline && !matches!(args.transport.as_str(), "stdio" | "ipc") {
        return Err(Failure::usage(format!(
            "--baseline compares against the raw channel of a process transport and Python's pools; run it with --transport stdio or ipc (not {})",
            args.transport
        )));
    }
    let defaults = PoolConfig::new("defaults");
    let prefetch = args.prefetch.unwrap_or(defaults.prefetch);
    let prefetch_wait = args.prefetch_wait.unwrap_or(defaults.prefetch_wait);
    let assets = Assets::write(&[DEMO_HANDLERS, RAW_ECHO, PYTHON_POOLS])?;
    let app = assets.path(DEMO_HANDLERS.0);
    let bench = PoolBench {
        transport: args.transport.clone(),
        app: app.to_string_lossy().into_owned(),
        mode,
        prefetch,
        prefetch_wait,
        workload,
    };
    let mut baselines = if args.baseline {
        baseline::all(&args.transport, workload)
    } else {
        Vec::new()
    };
    if !args.only_baselines.is_empty() {
        let known: Vec<&str> = baselines.iter().map(|b| b.id).collect();
        if let Some(unknown) = args
            .only_baselines
            .iter()
            .find(|id| !known.contains(&id.as_str()))
        {
            return Err(Failure::usage(format!(
                "--only-baselines: no baseline {unknown:?}; the baselines are {}",
                known.join(", ")
            )));
        }
        baselines.retain(|b| args.only_baselines.iter().any(|id| id == b.id));
    }
    let python_path = if baselines.is_empty() {
        None
    } else {
        Some(baseline::interpreter(global).await?)
    };

    // Round r runs contender r, r+1, ... (0 is pypool, then the baselines), wrapping around.
    let contenders = 1 + baselines.len();
    let mut pypool_runs = Vec::new();
    let mut baseline_runs: Vec<Vec<Measurement>> = vec![Vec::new(); baselines.len()];
    let mut python = None;
    for round in 0..args.repeat as usize {
        for k in 0..contenders {
            let which = (round + k) % contenders;
            if which == 0 {
                let (measured, version) = bench.run_once(&ui, global).await?;
                python = python.or(version);
                pypool_runs.push(measured);
            } else {
                let b: &Baseline = &baselines[which - 1];
                let python_path = python_path.as_deref().expect("resolved with the baselines");
                let measured = b
                    .run(&ui, python_path, &args.transport, &assets, workload)
                    .await?;
                baseline_runs[which - 1].push(measured);
            }
        }
    }
    let compared: Vec<Compared> = baselines
        .iter()
        .zip(baseline_runs)
        .map(|(b, runs)| Compared::new(b, runs, &pypool_runs))
        .collect();

    let report = Report {
        transport: args.transport.clone(),
        mode,
        workers: workload.workers,
        concurrency: workload.concurrency,
        payload_bytes: workload.payload,
        prefetch,
        prefetch_wait_ms: crate::measure::ms(prefetch_wait),
        repeat: args.repeat,
        python,
        pypool: Summary::of(pypool_runs),
        baselines: args.baseline.then_some(Baselines(compared)),
    };
    if ui.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| Failure::failed(e.to_string()))?
        );
    } else {
        print_human(
            &report,
            args.prefetch.is_none() && args.prefetch_wait.is_none(),
        );
    }
    if report.pypool.errors > 0 {
        return Err(Failure::failed(format!(
            "{} of {} calls failed; first error: {}",
            report.pypool.errors,
            report.pypool.calls * u64::from(report.repeat),
            report.pypool.first_error.as_deref().unwrap_or("unknown")
        ))
        .json_printed());
    }
    Ok(ExitCode::SUCCESS)
}

/// pypool's side of the bench.
struct PoolBench {
    transport: String,
    app: String,
    mode: Mode,
    prefetch: usize,
    prefetch_wait: Duration,
    workload: Workload,
}

impl PoolBench {
    /// Starts a pool, runs the workload on it in the bench's mode, shuts it down. Returns the
    /// measurement and the workers' Python version.
    async fn run_once(
        &self,
        ui: &Ui,
        global: &Global,
    ) -> Result<(Measurement, Option<String>), Failure> {
        let w = self.workload;
        let launcher = pypool::launcher(&self.transport)?;
        let config = PoolConfig::new(&self.app)
            .name("bench")
            .size(w.workers)
            .python(&global.python)
            .prefetch(self.prefetch)
            .prefetch_wait(self.prefetch_wait)
            .max_waiters(w.concurrency.max(10_000));
        let spinner = ui.spinner(format!(
            "pypool ({}): starting {} workers",
            self.transport, w.workers
        ));
        let t0 = Instant::now();
        let pool = Pool::start(config, launcher).await;
        spinner.finish_and_clear();
        let pool = pool?;
        let startup = t0.elapsed();
        let python = pool.status().workers.first().map(|w| w.python.clone());

        let bar = ui.bar(
            w.calls,
            format!("pypool {} ({})", self.mode.name(), self.transport),
        );
        let driven = drive_pool(&pool, self.mode, w, &bar).await;
        bar.finish_and_clear();
        let spinner = ui.spinner("pypool: shutting down");
        pool.shutdown(Duration::from_secs(5)).await;
        spinner.finish_and_clear();
        Ok((driven.measurement(startup), python))
    }
}

/// Runs the workload on a started pool, as `mode` says.
async fn drive_pool(pool: &Pool, mode: Mode, w: Workload, bar: &indicatif::ProgressBar) -> Driven {
    match mode {
        Mode::Call => drive_calls(pool, w, bar).await,
        Mode::Map | Mode::MapUnordered => drive_map(pool, mode, w, bar).await,
    }
}

/// One map over all the calls' arguments, as `Pool::map` or `Pool::map_unordered`; every result
/// is checked as `drive_calls` checks a call's.
async fn drive_map(pool: &Pool, mode: Mode, w: Workload, bar: &indicatif::ProgressBar) -> Driven {
    let data = Bytes::from(vec![b'x'; w.payload]);
    let payload = w.payload;
    let items = (0..w.calls).map(move |index| {
        if payload == 0 {
            // One positional argument, as imap_unordered's f(i).
            return Payload::new(json!(index));
        }
        let mut args = Payload::default();
        let placeholder = args.attach(data.clone());
        args.value = json!({ "value": placeholder });
        args
    });
    let check = |index: u64, result: pypool::Result<Payload>| -> Result<(), String> {
        let reply = result.map_err(|err| err.to_string())?;
        if payload == 0 {
            return match reply.value.as_u64() == Some(index) {
                true => Ok(()),
                false => Err(format!("echo({index}) returned {}", reply.value)),
            };
        }
        match reply.as_bytes() {
            Some(bytes) if bytes.len() == payload => Ok(()),
            Some(bytes) => Err(format!(
                "echo returned {} bytes instead of {payload}",
                bytes.len()
            )),
            None => Err(format!("echo returned {} instead of bytes", reply.value)),
        }
    };
    let options = MapOptions::new().chunksize(w.chunksize);
    let mut outcome = MapOutcome::default();
    let started = Instant::now();
    match mode {
        Mode::Map => {
            let mut results = pool.map_with("echo", items, options);
            let mut index = 0u64;
            while let Some(result) = results.next().await {
                outcome.record(check(index, result), bar);
                index += 1;
            }
        }
        _ => {
            let mut results = pool.map_unordered_with("echo", items, options);
            while let Some((index, result)) = results.next().await {
                outcome.record(check(index as u64, result), bar);
            }
        }
    }
    let duration = started.elapsed();
    // A map that ended early (its command unknown, the pool stopping) made fewer calls.
    let missing = w.calls.saturating_sub(outcome.calls);
    if missing > 0 {
        outcome.errors += missing;
        outcome
            .first_error
            .get_or_insert_with(|| format!("{missing} items got no result"));
    }
    Driven {
        histogram: crate::measure::histogram(),
        calls: w.calls,
        errors: outcome.errors,
        first_error: outcome.first_error,
        duration,
        per_call_latency: false,
    }
}

/// What a map run saw, item by item.
#[derive(Default)]
struct MapOutcome {
    calls: u64,
    errors: u64,
    first_error: Option<String>,
}

impl MapOutcome {
    fn record(&mut self, checked: Result<(), String>, bar: &indicatif::ProgressBar) {
        self.calls += 1;
        if let Err(err) = checked {
            self.errors += 1;
            self.first_error.get_or_insert(err);
        }
        if self.calls % 1024 == 0 {
            bar.inc(1024);
        }
    }
}

/// CONCURRENCY callers share the calls, each making one `pool.call` at a time: with payload 0
/// `echo(value=i)` for call number i (checked to return i), else an echo of the payload's bytes.
async fn drive_calls(pool: &Pool, w: Workload, bar: &indicatif::ProgressBar) -> Driven {
    let data = Bytes::from(vec![b'x'; w.payload]);
    let expected = w.payload;
    let pool = pool.clone();
    drive(w.concurrency, w.calls, bar, move |_, index| {
        let pool = pool.clone();
        let data = data.clone();
        async move {
            if expected == 0 {
                return match pool.call("echo", json!({ "value": index })).await {
                    Ok(reply) if reply.value == json!(index) => Ok(()),
                    Ok(reply) => Err(format!("echo({index}) returned {}", reply.value)),
                    Err(err) => Err(err.to_string()),
                };
            }
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
    .await
}

fn print_human(report: &Report, default_prefetch: bool) {
    let p = &report.pypool;
    let workload = if report.payload_bytes == 0 {
        "a no-op handler (a small int in, the same out)".to_owned()
    } else {
        format!("an echo of {}", fmt_bytes(report.payload_bytes as u64))
    };
    say(&format!(
        "pypool bench: transport {}, {} workers, {} concurrent callers, {} calls of {workload} per run, prefetch {} within {}{}, {} run{}{}.",
        report.transport,
        report.workers,
        report.concurrency,
        fmt_count(p.calls),
        report.prefetch,
        fmt_us(report.prefetch_wait_ms * 1e3),
        if default_prefetch { " (default)" } else { "" },
        report.repeat,
        if report.repeat == 1 { "" } else { "s" },
        report
            .python
            .as_deref()
            .map(|v| format!(", Python {v}"))
            .unwrap_or_default()
    ));
    println!();
    let pypool_name = format!("pypool {} ({})", report.mode.name(), report.transport);
    let several = report.repeat > 1;
    let empty = Vec::new();
    let baselines = report.baselines.as_ref().map_or(&empty, |b| &b.0);
    let compare = !baselines.is_empty();
    let range = |r: Range| {
        if several {
            fmt_rate_range(r.0, r.1)
        } else {
            String::new()
        }
    };
    let contenders: Vec<(&str, &Summary, Option<&Speedup>)> =
        std::iter::once((pypool_name.as_str(), p, None))
            .chain(
                baselines
                    .iter()
                    .map(|b| (b.label.as_str(), &b.summary, Some(&b.pypool_speedup))),
            )
            .collect();
    let vs = |s: Option<&Figure>, with_range: bool| {
        if s.is_none() && !compare {
            String::new()
        } else {
            fmt_speedup(s, with_range)
        }
    };

    // Throughput: every contender.
    let headers = [
        "throughput",
        "calls/s",
        if several { "min–max" } else { "" },
        if compare { "pypool is" } else { "" },
    ];
    let rows: Vec<Vec<String>> = contenders
        .iter()
        .map(|(name, s, speedup)| {
            vec![
                (*name).to_owned(),
                fmt_rate(s.throughput_per_s),
                range(s.spread.throughput_per_s),
                speedup.map_or(String::new(), |x| vs(x.throughput.as_ref(), several)),
            ]
        })
        .collect();
    print!("{}", compact_table(&headers, rows));
    println!();

    // Latency: the contenders with a per-call latency.
    let headers = [
        "latency",
        "mean",
        "p50",
        "p99",
        if compare { "pypool is: mean" } else { "" },
        if compare { "p99" } else { "" },
    ];
    let rows: Vec<Vec<String>> = contenders
        .iter()
        .filter_map(|(name, s, speedup)| {
            let l = s.latency_us.as_ref()?;
            Some(vec![
                (*name).to_owned(),
                fmt_us(l.mean),
                fmt_us(l.p50 as f64),
                fmt_us(l.p99 as f64),
                speedup.map_or(String::new(), |x| vs(x.mean.as_ref(), several)),
                speedup.map_or(String::new(), |x| vs(x.p99.as_ref(), false)),
            ])
        })
        .collect();
    if !rows.is_empty() {
        print!("{}", compact_table(&headers, rows));
        println!();
    }

    // Start-up: every contender.
    let headers = ["start-up", "time", if several { "min–max" } else { "" }];
    let rows: Vec<Vec<String>> = contenders
        .iter()
        .map(|(name, s, _)| {
            vec![
                (*name).to_owned(),
                fmt_us(s.startup_ms * 1e3),
                if several {
                    format!(
                        "{}–{}",
                        fmt_us(s.spread.startup_ms.0 * 1e3),
                        fmt_us(s.spread.startup_ms.1 * 1e3)
                    )
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    print!("{}", compact_table(&headers, rows));
    println!();

    let failed: Vec<String> = contenders
        .iter()
        .filter(|(_, s, _)| s.errors > 0)
        .map(|(name, s, _)| {
            format!(
                "{name}: {} ({})",
                fmt_count(s.errors),
                s.first_error.as_deref().unwrap_or("no message")
            )
        })
        .collect();
    if failed.is_empty() {
        say("errors: none (every result checked).");
    } else {
        say(&format!("errors: {}", failed.join("; ")));
    }
    say(&format!(
        "start-up: until every worker is ready. latency: per call as the caller sees it, queueing included. Figures: median of {} run{}{}.",
        report.repeat,
        if several { "s" } else { "" },
        if several { ", with their range (min–max)" } else { "" },
    ));
    if !baselines.is_empty() {
        say(&format!(
            "pypool is: how pypool compares with that row, within each round (median{}): \"2.00x faster\" is twice the calls per second, or half the latency; \"2.00x slower\" is half the calls per second, or twice the latency.",
            if several { " [and range]" } else { "" }
        ));
        say("Pool = multiprocessing.Pool, Executor = concurrent.futures.ProcessPoolExecutor. The map rows hand the whole batch to the pool at once and have no per-call latency; the thread rows call one item at a time from each of CONCURRENCY threads.");
        say("raw floor: Python echoing length-prefixed frames over the same kind of channel (pipes for stdio, a Unix socket for ipc), pipelined, driven from Rust with no protocol and no pool.");
    }
}

/// Prints a paragraph wrapped to the width of the tables.
fn say(text: &str) {
    println!("{}", wrap(text, MAX_WIDTH));
}

/// [`table`] without the columns whose header and cells are all empty (those that do not apply
/// to this report).
fn compact_table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let keep: Vec<bool> = (0..headers.len())
        .map(|i| i == 0 || !headers[i].is_empty() || rows.iter().any(|r| !r[i].is_empty()))
        .collect();
    let pick = |cells: Vec<String>| -> Vec<String> {
        cells
            .into_iter()
            .zip(&keep)
            .filter_map(|(c, k)| k.then_some(c))
            .collect()
    };
    let headers: Vec<&str> = headers
        .iter()
        .zip(&keep)
        .filter_map(|(h, k)| k.then_some(*h))
        .collect();
    let rows: Vec<Vec<String>> = rows.into_iter().map(pick).collect();
    table(&headers, &rows, 0)
}
