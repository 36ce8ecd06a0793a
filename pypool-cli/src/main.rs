//! `pypool`: try, measure and check pools of Python workers from the command line.
//!
//! `pypool demo` shows a pool at work, `pypool bench` measures it (against baselines with
//! `--baseline`), `pypool call` runs one handler of your own module, and `pypool doctor` checks
//! the machine. Run `pypool --help` and `pypool <command> --help` for the details.

#[cfg(unix)]
mod assets;
#[cfg(unix)]
mod baseline;
#[cfg(unix)]
mod bench;
#[cfg(unix)]
mod call;
#[cfg(unix)]
mod demo;
#[cfg(unix)]
mod doctor;
#[cfg(unix)]
mod measure;
#[cfg(unix)]
mod runtime;
#[cfg(unix)]
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the command ran but failed (a call raised, timed out or crashed; a check failed)
  2  usage error (bad option, unknown transport, invalid JSON arguments)
  3  the workers could not start (interpreter missing, app module or file not importable)

Environment: RUST_LOG overrides the log filter of -v (e.g. RUST_LOG=pypool::worker=info shows
what workers write to stderr). With the default --python, PYPOOL_PYTHON names the interpreter,
else an active virtualenv (VIRTUAL_ENV) is used, else python3 in PATH.";

const BENCH_AFTER_HELP: &str = "\
With --json, one object on stdout; every figure is the median over the runs:
  {\"transport\", \"mode\", \"workers\", \"concurrency\", \"payload_bytes\", \"prefetch\",
   \"prefetch_wait_ms\", \"repeat\",
   \"python\", \"calls\" (per run), \"errors\" (all runs), \"startup_ms\", \"duration_ms\",
   \"throughput_per_s\", \"latency_us\": {\"mean\", \"p50\", \"p99\", \"p999\", \"max\"} (null
   in the map modes),
   \"spread\": {\"startup_ms\": [min, max], \"throughput_per_s\": [min, max],
              \"latency_us\": {\"mean\", \"p50\", \"p99\", \"p999\": [min, max]}},
   \"runs\": [every run's figures],
   \"baselines\" (with --baseline): {\"raw_floor\", \"imap_unordered_chunksize_1\",
       \"imap_unordered_auto_chunksize\", \"executor_map\", \"pool_apply_threads\",
       \"executor_submit_threads\"},
     each with the same figures (\"latency_us\" is null for the map rows) and
     \"label\", \"description\", \"chunksize\" (map rows),
     \"pypool_speedup\": {\"throughput\", \"mean\", \"p50\", \"p99\"}, each {\"median\", \"min\", \"max\"}}
  pypool_speedup has one direction for every figure: above 1, pypool is that many times
  faster (throughput: pypool's / the baseline's; latency: the baseline's / pypool's); below 1,
  pypool is 1/that many times slower. It is computed within each round and summarised over them.

Examples:
  pypool bench
  pypool bench --baseline --workers 2 --concurrency 64 --calls 100000
  pypool bench --workers 2 --concurrency 8 --calls 20000 --payload 4KiB --prefetch 0
  pypool bench --baseline --json
  pypool bench --mode map-unordered --calls 1000000 --baseline --only-baselines \\
      imap_unordered_auto_chunksize,executor_map";

/// Pools of long-lived Python worker processes for Rust services.
///
/// A Rust program keeps a pool of Python processes and calls plain Python functions in them.
/// This tool shows a pool at work (`demo`), measures it against the alternatives (`bench`), runs
/// one function of your own module (`call`) and checks this machine (`doctor`). Everything works
/// with a bare `python3`: the worker runtime is embedded in this binary.
#[derive(Debug, Parser)]
#[command(name = "pypool", version, after_help = EXIT_CODES, propagate_version = true)]
pub struct Cli {
    /// Options every command accepts.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The Python interpreter for the workers: a name looked up in PATH or a path (shims such
    /// as pyenv's are resolved once, through `sys.executable`). The default means
    /// $PYPOOL_PYTHON if set, else the active virtualenv ($VIRTUAL_ENV), else python3 in PATH.
    #[arg(long, global = true, value_name = "PATH", default_value = "python3")]
    pub python: PathBuf,

    /// Log what the pool does to stderr: -v for info (including what workers write to their
    /// stderr), -vv for debug, -vvv for everything.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Print one JSON object on stdout instead of tables (and no progress bars), also for
    /// usage errors.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a pool on a bundled demo module, run a mixed workload, and show what happened.
    ///
    /// The workload has the shape that broke the pool this project replaces: 12 concurrent
    /// callers on a few workers, four sessions that keep state in their worker (strict
    /// affinity), a slow call that occupies a worker for a second, and a call whose handler
    /// raises. The report shows the start-up time (all workers start concurrently), every
    /// worker and session from `pool.status()`, latency percentiles from `pool.stats()`, the
    /// structured error of the failing call (type, message, Python traceback), and the
    /// shutdown, after which no worker process is left.
    ///
    /// Needs nothing but a Python 3 interpreter.
    #[command(after_help = "Examples:\n  pypool demo\n  pypool demo --workers 8 --json")]
    Demo(DemoArgs),

    /// Measure start-up, throughput and latency; with --baseline, against the alternatives.
    ///
    /// Starts a pool (start-up = until every worker has finished its handshake), then
    /// CONCURRENCY callers share CALLS calls: with --payload 0 (the default) of a no-op handler
    /// that gets a small int and returns it, otherwise of an echo of a PAYLOAD-byte binary
    /// attachment. Latency is measured per call by the caller (queueing included) in an HDR
    /// histogram. All of it is repeated --repeat times (3) with a fresh pool; the figures are
    /// medians, with their range.
    ///
    /// With --baseline the same workload also runs, in each round right after pypool, on:
    ///   - the raw floor: WORKERS Python processes echoing length-prefixed frames over the
    ///     transport's kind of channel (stdin/stdout for stdio, a Unix socket for ipc), driven
    ///     directly from Rust, pipelined: no protocol, no pool;
    ///   - multiprocessing.Pool.imap_unordered(f, items) with chunksize 1 (its default) and with
    ///     the chunksize Pool.map would choose, ceil(CALLS / (4 * WORKERS));
    ///   - ProcessPoolExecutor.map(f, items) with that same chunksize;
    ///   - Pool.apply and ProcessPoolExecutor.submit(...).result() from CONCURRENCY threads.
    ///
    /// Each row says how pypool compares: "1.90x faster" or "1.30x slower", for throughput and
    /// for latency (--baseline needs a process transport: stdio or ipc). The runs share one
    /// machine, so compare these ratios, not absolute numbers, and prefer a release build
    /// (`cargo run --release -p pypool-cli -- bench`).
    #[command(after_help = BENCH_AFTER_HELP, verbatim_doc_comment)]
    Bench(BenchArgs),

    /// Start one worker for your module, call one handler, print the result.
    ///
    /// APP is a path to a .py file or a dotted module name importable from the current
    /// directory (or PYTHONPATH). Handlers are functions decorated with
    /// `@pypool_worker.handler`. ARGS is JSON: an object is passed as keyword arguments, an
    /// array as positional arguments, null (the default) as no arguments, anything else as the
    /// single argument; `-` reads it from stdin.
    ///
    /// Prints the result as JSON. If the handler raises, prints the exception's type, message
    /// and traceback and exits with 1; if the worker cannot start (for instance the module does
    /// not import), prints the import error and exits with 3; if the module has no such
    /// handler, names the ones it has (and the one you likely meant) and exits with 2.
    #[command(
        after_help = "Examples:\n  pypool call --app examples/text_stats.py word_count '{\"text\": \"Hello there. Bye.\"}'\n  pypool call --app mypackage.handlers predict '[[1.0, 2.0]]'\n  echo '{\"a\": 1, \"b\": 2}' | pypool call --app handlers.py add -"
    )]
    Call(CallArgs),

    /// Check this machine: interpreter, runtime, optional Python modules, transports, platform.
    ///
    /// Resolves the interpreter the workers would run (following shims), shows its version and
    /// whether it can import msgpack (an optional codec) and zmq (for the zmq transport), lists
    /// the transports compiled into this binary and the platform's process controls, starts one
    /// real worker and calls it, and says what to do about anything missing. Exits with 1 if
    /// workers cannot run here.
    Doctor,

    /// Show the embedded Python runtime (`pypool_worker`), or where to import it from.
    ///
    /// Workers import `pypool_worker` from a private cache directory that pypool writes the
    /// embedded copy into. `--path` prints that directory (written if needed), so that editors,
    /// type checkers and pytest can import the same `pypool_worker` as the workers:
    /// `PYTHONPATH=$(pypool runtime --path) pytest`. To install it into an environment instead:
    /// `pip install ./python` from a checkout of the repository.
    #[command(
        after_help = "Examples:\n  pypool runtime\n  PYTHONPATH=\"$(pypool runtime --path)\" python3 -c 'import pypool_worker'"
    )]
    Runtime(RuntimeArgs),
}

/// `pypool runtime`.
#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// Print only the directory to put on PYTHONPATH.
    #[arg(long)]
    pub path: bool,
}

/// `pypool demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The transport to the workers (see `pypool doctor` for those compiled in).
    #[arg(long, short, value_name = "T", default_value = "stdio", value_parser = parse_transport)]
    pub transport: String,

    /// Permanent workers in the pool.
    #[arg(long, short, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=512))]
    pub workers: u16,

    /// Serve the pool's metrics in the Prometheus text format at http://ADDR/metrics while the
    /// demo runs (port 0 picks a free port; the address is printed on stderr). Needs a pypool
    /// built with the `metrics` feature (`cargo install pypool-cli --features metrics`).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// After the workload, keep the pool and the metrics endpoint up until standard input
    /// closes (or Ctrl-C), so the metrics can be scraped; prints a line on stderr when ready.
    #[arg(long, requires = "metrics_addr")]
    pub hold: bool,
}

/// `pypool bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The transport to the workers (see `pypool doctor` for those compiled in).
    #[arg(long, short, value_name = "T", default_value = "stdio", value_parser = parse_transport)]
    pub transport: String,

    /// Workers in the pool (and processes in each baseline). Default: the number of CPUs, as
    /// multiprocessing.Pool.
    #[arg(long, short, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=512))]
    pub workers: Option<u16>,

    /// Callers making calls at the same time (and caller threads in the thread baselines).
    #[arg(long, short, value_name = "C", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,

    /// Calls to make in each run (timed; start-up is measured separately).
    #[arg(long, short = 'n', value_name = "M", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub calls: u64,

    /// 0: a no-op handler that gets a small int and returns it. More: the size of a binary
    /// attachment each call sends and gets back: bytes, or with a unit (4KiB, 1MiB, 2MB); at
    /// most 64 MiB.
    #[arg(long, short, value_name = "SIZE", default_value = "0", value_parser = parse_payload)]
    pub payload: u32,

    /// Calls the pool may queue at a busy worker (`PoolConfig::prefetch`; 0 turns it off).
    /// Default: the pool's default.
    #[arg(long, value_name = "N")]
    pub prefetch: Option<usize>,

    /// How long a call queued at a worker may expect to wait behind the others, judged by the
    /// worker's recent pace (`PoolConfig::prefetch_wait`; it decides how much of --prefetch a
    /// worker gets): 500us, 1ms, 1s. Default: the pool's default.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub prefetch_wait: Option<Duration>,

    /// Runs of each figure (pypool's and every baseline's, back to back in each round); the
    /// tables show the median and the range.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,

    /// How the calls are made: `call` (CONCURRENCY callers, one `pool.call` at a time each),
    /// `map` (one `pool.map` over all the calls, results in order) or `map-unordered`
    /// (`pool.map_unordered`, the counterpart of `imap_unordered`). The map modes report no
    /// per-call latency.
    #[arg(long, value_name = "MODE", value_enum, default_value = "call")]
    pub mode: crate::bench::Mode,

    /// Items per chunk in the map modes (0: the pool's automatic choice, which for a batch of
    /// known length is Pool.map's, at most 1024).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub chunksize: usize,

    /// Also run the same workload on the raw channel (the floor) and on Python's own pools
    /// (multiprocessing.Pool.imap_unordered with chunksize 1 and with Pool.map's automatic
    /// chunksize, ProcessPoolExecutor.map, Pool.apply and ProcessPoolExecutor.submit from
    /// caller threads), and say how pypool compares with each.
    #[arg(long)]
    pub baseline: bool,

    /// With --baseline, run only these baselines (comma-separated ids, as in the JSON output:
    /// raw_floor, imap_unordered_chunksize_1, imap_unordered_auto_chunksize, executor_map,
    /// pool_apply_threads, executor_submit_threads). Default: all of them.
    #[arg(long, value_name = "IDS", value_delimiter = ',', requires = "baseline")]
    pub only_baselines: Vec<String>,
}

/// `pypool call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// The Python module with the handlers: a path to a .py file or a dotted module name.
    #[arg(long, value_name = "PATH_OR_MODULE")]
    pub app: String,

    /// The handler to call (its name as registered with @handler).
    #[arg(value_name = "COMMAND")]
    pub command: String,

    /// The arguments as JSON (`-` reads them from stdin). Default: null, no arguments.
    #[arg(value_name = "JSON_ARGS")]
    pub args: Option<String>,

    /// Make the call within this session (its state lives in the worker until the end).
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,

    /// Give up on the call after this long: 500ms, 30s, 2m, 1h (a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

fn parse_transport(name: &str) -> Result<String, pypool::UnknownTransport> {
    if pypool::transports().contains(&name) {
        Ok(name.to_owned())
    } else {
        Err(pypool::UnknownTransport {
            name: name.to_owned(),
        })
    }
}

/// `500ms`, `2m`, `1h 30m` (humantime), or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = match text.trim().parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Duration::from_secs_f64(seconds),
        Ok(_) => return Err("must be a positive duration".to_owned()),
        Err(_) => humantime::parse_duration(text)
            .map_err(|err| format!("{err} (write it as 500ms, 30s, 2m or 1h)"))?,
    };
    if duration.is_zero() || duration > Duration::from_secs(86_400 * 365) {
        return Err("must be more than 0 and at most a year".to_owned());
    }
    Ok(duration)
}

/// `65536`, `64KiB`, `1MiB`, `2MB`, at most 64 MiB.
fn parse_payload(text: &str) -> Result<u32, String> {
    const MAX: u64 = 64 * 1024 * 1024;
    let bytes = parse_size(text)?;
    if bytes > MAX {
        return Err(format!(
            "{bytes} bytes is more than the 64 MiB a bench payload may be"
        ));
    }
    u32::try_from(bytes).map_err(|err| err.to_string())
}

/// A byte count, bare or with a unit: B, KB/MB/GB (powers of 1000), KiB/MiB/GiB (of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit `{other}` (use B, KB, MB, KiB, MiB, GiB)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (e.g. 64, 4KiB, 1MiB)"))?;
    let bytes = value * factor as f64;
    if bytes.fract() != 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::new(spec),
        _ => EnvFilter::new(match verbose {
            0 => "off",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parses the command line; a usage error is printed (on stdout as JSON too with `--json`) and
/// ends the program with exit code 2.
fn parse() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(err) => {
            // Help and --version are not errors; everything else is a usage error (exit 2).
            let usage = err.use_stderr();
            if usage && std::env::args_os().skip(1).any(|arg| arg == "--json") {
                let detail = err.to_string();
                let message = detail.lines().next().unwrap_or_default();
                println!(
                    "{}",
                    serde_json::json!({"ok": false, "error": {
                        "type": "UsageError",
                        "message": message.trim_start_matches("error: "),
                        "detail": detail.trim_end(),
                        "exit_code": err.exit_code(),
                    }})
                );
            }
            let _ = err.print();
            Err(ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(2)))
        }
    }
}

#[cfg(unix)]
fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_tracing(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let global = cli.global.clone();
    let json = global.json;
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(&global, args).await,
            Command::Bench(args) => bench::run(&global, args).await,
            Command::Call(args) => call::run(&global, args).await,
            Command::Doctor => doctor::run(&global).await,
            Command::Runtime(args) => runtime::run(&global, args).await,
        }
    });
    // A reader still blocked on stdin (after Ctrl-C in `demo --hold`) must not keep us here.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(code) => code,
        Err(failure) => failure.report(json),
    }
}

#[cfg(not(unix))]
fn main() -> ExitCode {
    if let Err(code) = parse() {
        return code;
    }
    eprintln!("error: the pypool command-line tool needs a Unix system (the stdio transport's process control is Unix-only for now)");
    ExitCode::from(1)
}
