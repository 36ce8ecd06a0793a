//! The `pypool` binary, run as a user would, with real Python workers.
//!
//! Every test owns what it starts: the binary's process (killed by a watchdog if it ever hangs),
//! its temporary files, and the workers, which the binary shuts down and which the demo tests
//! prove gone.

use std::io::Write;
#[cfg(feature = "metrics")]
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use serde_json::Value;

/// Longest any one command may take before the test kills it and fails.
const LIMIT: Duration = Duration::from_secs(180);

/// Kills a process if it is still running when the limit expires.
struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<bool>>,
}

impl Watchdog {
    fn new(child: &Child) -> Self {
        let pid = child.id() as libc::pid_t;
        let (done, wait) = mpsc::channel::<()>();
        let thread = thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(LIMIT) {
                // SAFETY: plain syscall; the child is not reaped until the test's wait returns.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return true;
            }
            false
        });
        Watchdog {
            done: Some(done),
            thread: Some(thread),
        }
    }

    /// Stops the watchdog; panics if it had to kill.
    fn finish(mut self) {
        drop(self.done.take());
        let fired = self.thread.take().map(|t| t.join().unwrap_or(true));
        assert_ne!(fired, Some(true), "the command ran longer than {LIMIT:?}");
    }
}

fn pypool() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pypool"));
    command.env_remove("RUST_LOG");
    command
}

/// Runs the binary to completion (stdin closed) and returns its output.
fn run(args: &[&str]) -> Output {
    run_in(args, None)
}

fn run_in(args: &[&str], dir: Option<&Path>) -> Output {
    let mut command = pypool();
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let child = command.spawn().expect("the pypool binary starts");
    let watchdog = Watchdog::new(&child);
    let output = child.wait_with_output().expect("pypool runs");
    watchdog.finish();
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(output: &Output) -> String {
    format!(
        "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    )
}

/// The whole of stdout as exactly one JSON value.
fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "stdout is not one JSON object ({err}):\n{}",
            describe(output)
        )
    })
}

fn assert_exit(output: &Output, code: i32) {
    assert_eq!(output.status.code(), Some(code), "{}", describe(output));
}

fn alive(pid: u64) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn assert_latency(value: &Value, what: &str) {
    for key in ["mean", "p50", "p99", "p999"] {
        let n = value[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}.{key} is not a number: {value}"));
        assert!(n > 0.0, "{what}.{key} = {n}");
    }
    assert!(
        value["p50"].as_f64() <= value["p99"].as_f64(),
        "{what}: {value}"
    );
    assert!(
        value["p99"].as_f64() <= value["p999"].as_f64(),
        "{what}: {value}"
    );
}

#[test]
fn demo_runs_the_workload_and_shows_the_failing_call() {
    let output = run(&["demo"]);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    for expected in [
        "4 workers ready",
        "12 concurrent callers made 202 calls",
        "every recall found what its session remembered",
        "type       demo_handlers.OutOfStock",
        "message    blue widget, order 42: wanted 3, only 1 left",
        "Traceback (most recent call last):",
        "in _reserve",
        "user-4",
        "queue wait",
        "no worker process left",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?}:\n{}",
            describe(&output)
        );
    }
}

#[test]
fn demo_json_has_the_structured_error_and_leaves_no_process() {
    let output = run(&["demo", "--workers", "2", "--json"]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["transport"], "stdio");
    assert_eq!(report["workers"], 2);
    assert!(report["startup_ms"].as_f64() > Some(0.0));

    let workload = &report["workload"];
    assert_eq!(workload["callers"], 12);
    assert_eq!(workload["calls"], 202);
    assert_eq!(workload["ok"], 201);
    assert_eq!(workload["failed"], 1);
    assert_eq!(workload["session_state_consistent"], true);
    assert_eq!(workload["problems"], serde_json::json!([]));
    assert!(workload["slow_call_ms"].as_f64() >= Some(1000.0));

    let error = &report["failing_call"]["error"];
    assert_eq!(error["type"], "demo_handlers.OutOfStock");
    assert_eq!(
        error["message"],
        "blue widget, order 42: wanted 3, only 1 left"
    );
    let traceback = error["traceback"].as_str().unwrap_or_default();
    assert!(traceback.contains("in _reserve"), "{traceback}");

    let workers = report["status"]["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(workers.len(), 2, "{report}");
    let sessions = report["status"]["sessions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(sessions.len(), 4, "{report}");
    for session in &sessions {
        assert_eq!(session["affinity"], "strict");
        assert_eq!(session["calls"], 20);
        assert_eq!(session["errors"], 0);
    }
    assert_eq!(report["stats"]["counters"]["calls_ok"], 201);
    assert_eq!(report["stats"]["counters"]["handler_errors"], 1);
    assert_eq!(report["stats"]["queue_wait"]["count"], 202);

    assert_eq!(report["processes_left"], 0);
    for worker in &workers {
        let pid = worker["pid"].as_u64().expect("a worker pid");
        assert!(!alive(pid), "worker process {pid} outlived the demo");
    }
}

#[test]
fn bench_json_is_one_object_with_every_documented_key() {
    let output = run(&["bench", "--json", "--calls", "200", "--workers", "2"]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["transport"], "stdio");
    assert_eq!(report["mode"], "call");
    assert_eq!(report["workers"], 2);
    assert_eq!(report["concurrency"], 64);
    assert_eq!(report["calls"], 200);
    assert_eq!(report["payload_bytes"], 0, "the default is the no-op");
    assert_eq!(report["prefetch"], 64, "the pool's default");
    assert_eq!(report["repeat"], 3);
    assert_eq!(report["errors"], 0);
    assert!(report["startup_ms"].as_f64() > Some(0.0), "{report}");
    assert!(report["throughput_per_s"].as_f64() > Some(0.0), "{report}");
    assert_latency(&report["latency_us"], "latency_us");
    assert_spread(&report, "pypool");
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 3, "{report}");
    for run in runs {
        assert_eq!(run["calls"], 200, "{run}");
        assert_latency(&run["latency_us"], "runs[].latency_us");
    }
    assert!(report.get("baselines").is_none(), "{report}");
}

/// `spread` holds [min, max] around each median figure.
fn assert_spread(value: &Value, what: &str) {
    let spread = &value["spread"];
    let within = |median: &Value, range: &Value, name: &str| {
        let (lo, hi) = (range[0].as_f64(), range[1].as_f64());
        assert!(
            lo.is_some() && lo <= median.as_f64() && median.as_f64() <= hi,
            "{what}: {name} {median} outside {range}"
        );
    };
    within(&value["startup_ms"], &spread["startup_ms"], "startup_ms");
    within(
        &value["throughput_per_s"],
        &spread["throughput_per_s"],
        "throughput_per_s",
    );
    if value["latency_us"].is_null() {
        assert!(spread["latency_us"].is_null(), "{what}: {spread}");
    } else {
        for key in ["mean", "p50", "p99", "p999"] {
            within(
                &value["latency_us"][key],
                &spread["latency_us"][key],
                &format!("latency_us.{key}"),
            );
        }
    }
}

#[test]
fn bench_payload_travels_as_bytes() {
    let output = run(&[
        "bench",
        "--json",
        "--calls",
        "50",
        "--workers",
        "1",
        "--concurrency",
        "3",
        "--payload",
        "100000",
        "--repeat",
        "1",
    ]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["payload_bytes"], 100_000);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["concurrency"], 3);
    assert_eq!(report["repeat"], 1);
    assert_eq!(report["runs"].as_array().map(Vec::len), Some(1));
}

#[test]
fn bench_passes_prefetch_to_the_pool() {
    for prefetch in ["0", "3"] {
        let output = run(&[
            "bench",
            "--json",
            "--calls",
            "100",
            "--workers",
            "1",
            "--concurrency",
            "8",
            "--repeat",
            "1",
            "--prefetch",
            prefetch,
        ]);
        assert_exit(&output, 0);
        let report = json_of(&output);
        assert_eq!(report["prefetch"].to_string(), prefetch, "{report}");
        assert_eq!(
            report["prefetch_wait_ms"], 1.0,
            "the pool's default: {report}"
        );
        assert_eq!(report["errors"], 0, "{report}");
    }
    let output = run(&[
        "bench",
        "--json",
        "--calls",
        "100",
        "--workers",
        "1",
        "--repeat",
        "1",
        "--prefetch-wait",
        "2ms",
    ]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["prefetch_wait_ms"], 2.0, "{report}");
    assert_eq!(report["prefetch"], 64, "{report}");
}

/// Every baseline of `--baseline`, by its key in the JSON output, and whether it has a
/// per-call latency.
const BASELINES: [(&str, bool); 6] = [
    ("raw_floor", true),
    ("imap_unordered_chunksize_1", false),
    ("imap_unordered_auto_chunksize", false),
    ("executor_map", false),
    ("pool_apply_threads", true),
    ("executor_submit_threads", true),
];

#[test]
fn bench_baseline_measures_the_floor_and_pythons_pools() {
    let output = run(&[
        "bench",
        "--baseline",
        "--calls",
        "200",
        "--workers",
        "2",
        "--repeat",
        "2",
        "--json",
    ]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["calls"], 200);
    assert_latency(&report["latency_us"], "latency_us");
    let baselines = &report["baselines"];
    let mut keys: Vec<&str> = baselines
        .as_object()
        .expect("baselines is an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut expected = BASELINES.map(|(name, _)| name);
    expected.sort_unstable();
    assert_eq!(keys, expected.to_vec());
    for (name, per_call) in BASELINES {
        let b = &baselines[name];
        assert!(b.is_object(), "no baseline {name}: {report}");
        assert_eq!(b["calls"], 200, "{name}: {b}");
        assert_eq!(b["errors"], 0, "{name}: {b}");
        assert_eq!(b["runs"].as_array().map(Vec::len), Some(2), "{name}: {b}");
        assert!(b["startup_ms"].as_f64() > Some(0.0), "{name}: {b}");
        assert!(b["throughput_per_s"].as_f64() > Some(0.0), "{name}: {b}");
        assert!(b["description"].is_string(), "{name}: {b}");
        assert!(b["label"].is_string(), "{name}: {b}");
        assert_spread(b, name);
        let speedup = &b["pypool_speedup"];
        let figure = |key: &str| {
            let f = &speedup[key];
            for part in ["median", "min", "max"] {
                assert!(
                    f[part].as_f64() > Some(0.0),
                    "{name}.pypool_speedup.{key}.{part}: {b}"
                );
            }
            assert!(f["min"].as_f64() <= f["median"].as_f64(), "{name}: {f}");
            assert!(f["median"].as_f64() <= f["max"].as_f64(), "{name}: {f}");
        };
        figure("throughput");
        if per_call {
            assert_latency(&b["latency_us"], name);
            for key in ["mean", "p50", "p99"] {
                figure(key);
            }
        } else {
            assert!(b["latency_us"].is_null(), "{name}: {b}");
            assert!(speedup["mean"].is_null(), "{name}: {b}");
        }
    }
    // imap_unordered's default chunksize, and the one Pool.map computes: ceil(200 / (4 * 2)).
    assert_eq!(baselines["imap_unordered_chunksize_1"]["chunksize"], 1);
    assert_eq!(baselines["imap_unordered_auto_chunksize"]["chunksize"], 25);
    assert_eq!(baselines["executor_map"]["chunksize"], 25);
}

#[test]
fn bench_human_output_is_a_table() {
    let output = run(&["bench", "--calls", "100", "--workers", "1", "--repeat", "1"]);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("pypool call (stdio)"),
        "{}",
        describe(&output)
    );
    assert!(stdout.contains("throughput"), "{}", describe(&output));
    assert!(stdout.contains("no-op"), "{}", describe(&output));
}

/// A handlers module in a fresh directory.
fn app_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut file = std::fs::File::create(dir.path().join("handlers.py")).expect("handlers.py");
    file.write_all(
        br#"
from pypool_worker import handler

class Boom(Exception):
    pass

@handler
def add(a, b):
    return a + b

@handler
def shout(text):
    return text.upper().encode()

def _explode(what):
    raise Boom("cannot " + what)

@handler
def boom(what="do it"):
    _explode(what)
"#,
    )
    .expect("write handlers.py");
    dir
}

#[test]
fn call_prints_the_result() {
    let dir = app_dir();
    let output = run_in(
        &[
            "call",
            "--app",
            "handlers.py",
            "add",
            r#"{"a": 2, "b": 40}"#,
        ],
        Some(dir.path()),
    );
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout).trim(), "42");

    // A module name works too, and --json wraps the result; bytes are shown readably.
    let output = run_in(
        &["--json", "call", "--app", "handlers", "shout", r#"["hi"]"#],
        Some(dir.path()),
    );
    assert_exit(&output, 0);
    let reply = json_of(&output);
    assert_eq!(reply["ok"], true);
    assert_eq!(
        reply["result"],
        serde_json::json!({"bytes": 2, "utf8": "HI"})
    );
}

#[test]
fn call_shows_the_structured_error_when_the_handler_raises() {
    let dir = app_dir();
    let output = run_in(
        &[
            "call",
            "--app",
            "handlers.py",
            "boom",
            r#"{"what": "divide by zero"}"#,
        ],
        Some(dir.path()),
    );
    assert_exit(&output, 1);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("`boom` raised handlers.Boom: cannot divide by zero"),
        "{}",
        describe(&output)
    );
    assert!(
        stderr.contains("Traceback (most recent call last):"),
        "{}",
        describe(&output)
    );
    assert!(stderr.contains("in _explode"), "{}", describe(&output));

    let output = run_in(
        &["--json", "call", "--app", "handlers.py", "boom"],
        Some(dir.path()),
    );
    assert_exit(&output, 1);
    let reply = json_of(&output);
    assert_eq!(reply["ok"], false);
    assert_eq!(reply["error"]["type"], "handlers.Boom");
    assert_eq!(reply["error"]["message"], "cannot do it");
    assert!(reply["error"]["traceback"]
        .as_str()
        .is_some_and(|t| t.contains("_explode")));
}

#[test]
fn call_explains_a_missing_module_or_file() {
    let dir = app_dir();
    let output = run_in(
        &["call", "--app", "no_such_module_for_pypool_tests", "f"],
        Some(dir.path()),
    );
    assert_exit(&output, 3);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("No module named 'no_such_module_for_pypool_tests'"),
        "{}",
        describe(&output)
    );
    assert!(stderr.contains("hint:"), "{}", describe(&output));

    let output = run_in(&["call", "--app", "missing.py", "f"], Some(dir.path()));
    assert_exit(&output, 3);
    assert!(
        text(&output.stderr).contains("app file `missing.py` not found"),
        "{}",
        describe(&output)
    );
}

#[test]
fn call_rejects_invalid_json_args() {
    let dir = app_dir();
    let output = run_in(
        &["call", "--app", "handlers.py", "add", "{a: 1}"],
        Some(dir.path()),
    );
    assert_exit(&output, 2);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("JSON_ARGS is not valid JSON"),
        "{}",
        describe(&output)
    );
    assert!(stderr.contains("{a: 1}"), "{}", describe(&output));
}

#[test]
fn call_reads_args_from_stdin() {
    let dir = app_dir();
    let mut child = pypool()
        .args(["call", "--app", "handlers.py", "add", "-"])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pypool starts");
    let watchdog = Watchdog::new(&child);
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(br#"{"a": 1, "b": 2}"#).expect("write args");
    }
    let output = child.wait_with_output().expect("pypool runs");
    watchdog.finish();
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout).trim(), "3");
}

#[test]
fn doctor_json_describes_the_machine() {
    let output = run(&["doctor", "--json"]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["ok"], true);
    assert_eq!(report["python"]["ok"], true);
    assert!(
        report["python"]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "{report}"
    );
    assert!(report["python"]["executable"].is_string(), "{report}");
    assert!(
        report["runtime"]["embedded_version"].is_string(),
        "{report}"
    );
    for module in ["msgpack", "zmq"] {
        assert!(
            report["modules"][module]["available"].is_boolean(),
            "{report}"
        );
    }
    let compiled = report["transports"]["compiled_in"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(compiled.contains(&Value::from("stdio")), "{report}");
    assert!(
        report["platform"]["process_groups"].is_boolean(),
        "{report}"
    );
    assert_eq!(
        report["platform"]["parent_death_signal"],
        cfg!(target_os = "linux"),
        "{report}"
    );
    assert_eq!(report["worker_check"]["ok"], true, "{report}");
    assert!(report["advice"].is_array(), "{report}");
}

#[test]
fn doctor_says_what_to_do_without_an_interpreter() {
    let output = run(&["--python", "/nonexistent/python3", "doctor"]);
    assert_exit(&output, 1);
    let stdout = text(&output.stdout);
    assert!(stdout.contains("not found"), "{}", describe(&output));
    assert!(stdout.contains("--python PATH"), "{}", describe(&output));
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        &["frobnicate"][..],
        &["bench", "--workers", "0"],
        &["bench", "--calls", "many"],
        &["bench", "--repeat", "0"],
        &["bench", "--prefetch", "-1"],
        &["demo", "--transport", "pigeon"],
        &["call", "add"],
        &[],
    ] {
        let output = run(args);
        assert_exit(&output, 2);
        assert!(
            text(&output.stderr).contains("error"),
            "{args:?}: {}",
            describe(&output)
        );
    }
    let output = run(&["demo", "--transport", "pigeon"]);
    assert!(
        text(&output.stderr).contains("unknown transport 'pigeon'; available: stdio"),
        "{}",
        describe(&output)
    );
}

#[test]
fn help_teaches() {
    let output = run(&["--help"]);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    for expected in ["demo", "bench", "call", "doctor", "--python", "Exit codes"] {
        assert!(stdout.contains(expected), "{expected}: {stdout}");
    }
    let output = run(&["bench", "--help"]);
    let help = text(&output.stdout);
    assert!(help.contains("multiprocessing.Pool"), "{help}");
    // The list in the long help keeps its lines and bullets.
    assert!(
        help.contains("on:\n  - the raw floor: WORKERS Python processes"),
        "{help}"
    );
}

#[test]
fn usage_errors_are_json_with_json() {
    for args in [
        &["--json", "bench", "--workers", "0"][..],
        &["--json", "frobnicate"],
        &["demo", "--transport", "pigeon", "--json"],
    ] {
        let output = run(args);
        assert_exit(&output, 2);
        let report = json_of(&output);
        assert_eq!(report["ok"], false, "{args:?}: {report}");
        assert_eq!(report["error"]["type"], "UsageError", "{args:?}: {report}");
        assert_eq!(report["error"]["exit_code"], 2, "{args:?}: {report}");
        assert!(
            report["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{args:?}: {report}"
        );
    }
    let output = run(&["--json", "demo", "--transport", "pigeon"]);
    let report = json_of(&output);
    assert!(
        report["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown transport 'pigeon'")),
        "{report}"
    );
    // Help is not an error: no JSON, exit 0.
    let output = run(&["--json", "--help"]);
    assert_exit(&output, 0);
    assert!(text(&output.stdout).contains("Usage:"));
}

#[test]
fn bench_takes_sizes_with_units_and_its_baseline_table_fits_100_columns() {
    let output = run(&[
        "bench",
        "--calls",
        "40",
        "--workers",
        "1",
        "--concurrency",
        "2",
        "--payload",
        "1MiB",
        "--repeat",
        "2",
        "--baseline",
    ]);
    assert_exit(&output, 0);
    let stdout = text(&output.stdout);
    assert!(stdout.contains("1.0 MiB"), "{}", describe(&output));
    for line in stdout.lines() {
        assert!(line.chars().count() <= 100, "{line:?}\n{stdout}");
    }
    // Each baseline has a row, and says in words how pypool compares.
    for label in [
        "raw floor (pipes)",
        "Pool.imap_unordered, chunksize 1",
        "Pool.imap_unordered, chunksize 10 (auto)",
        "Executor.map, chunksize 10",
        "Pool.apply from 2 threads",
        "Executor.submit from 2 threads",
    ] {
        let row = stdout
            .lines()
            .find(|line| line.starts_with(label))
            .unwrap_or_else(|| panic!("no row {label:?}:\n{stdout}"));
        assert!(
            row.contains("x faster") || row.contains("x slower"),
            "{row:?}\n{stdout}"
        );
    }
    assert!(stdout.contains("latency"), "{stdout}");
    assert!(stdout.contains("start-up"), "{stdout}");

    let output = run(&["bench", "--payload", "65MiB"]);
    assert_exit(&output, 2);
    assert!(
        text(&output.stderr).contains("64 MiB"),
        "{}",
        describe(&output)
    );
}

#[test]
fn call_names_the_handlers_when_one_is_unknown() {
    let dir = app_dir();
    let output = run_in(
        &["call", "--app", "handlers.py", "shuot", r#"["hi"]"#],
        Some(dir.path()),
    );
    assert_exit(&output, 2);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("the app has no handler `shuot` (did you mean `shout`?); its handlers: add, boom, shout"),
        "{}",
        describe(&output)
    );
    let output = run_in(
        &["--json", "call", "--app", "handlers.py", "shuot"],
        Some(dir.path()),
    );
    assert_exit(&output, 2);
    let report = json_of(&output);
    assert_eq!(report["error"]["type"], "UnknownCommand", "{report}");
}

#[test]
fn call_timeouts_read_like_durations() {
    let dir = app_dir();
    let output = run_in(
        &[
            "call",
            "--app",
            "handlers.py",
            "--timeout",
            "1m 30s",
            "add",
            r#"{"a": 1, "b": 2}"#,
        ],
        Some(dir.path()),
    );
    assert_exit(&output, 0);
    assert_eq!(text(&output.stdout).trim(), "3");
    let output = run_in(
        &["call", "--app", "handlers.py", "--timeout", "soon", "add"],
        Some(dir.path()),
    );
    assert_exit(&output, 2);
    assert!(
        text(&output.stderr).contains("500ms"),
        "{}",
        describe(&output)
    );
}

#[test]
fn runtime_path_is_importable() {
    let output = run(&["runtime", "--path"]);
    assert_exit(&output, 0);
    let path = text(&output.stdout).trim().to_owned();
    assert!(
        Path::new(&path).join("pypool_worker/__init__.py").is_file(),
        "{}",
        describe(&output)
    );
    let imported = Command::new("python3")
        .args([
            "-c",
            "import pypool_worker, sys; print(pypool_worker.__file__)",
        ])
        .env("PYTHONPATH", &path)
        .output()
        .expect("python3 runs");
    assert!(imported.status.success(), "{}", describe(&imported));
    assert!(
        text(&imported.stdout).starts_with(&path),
        "{}",
        describe(&imported)
    );

    let output = run(&["runtime", "--json"]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["path"], Value::from(path));
    assert!(report["version"].is_string(), "{report}");
}

#[cfg(not(feature = "metrics"))]
#[test]
fn metrics_addr_says_which_feature_it_needs() {
    let output = run(&["demo", "--metrics-addr", "127.0.0.1:0"]);
    assert_exit(&output, 2);
    assert!(
        text(&output.stderr).contains("--features metrics"),
        "{}",
        describe(&output)
    );
}

#[cfg(feature = "testkit")]
#[test]
fn the_fake_transport_runs_without_python() {
    let output = run(&["bench", "--transport", "fake", "--json", "--calls", "300"]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["transport"], "fake");
    assert_eq!(report["errors"], 0);
    assert_eq!(report["runs"].as_array().map(Vec::len), Some(3));

    // The no-op and the binary echo, with prefetch set and off: every result is checked.
    for (payload, prefetch) in [("0", "0"), ("0", "8"), ("100", "8")] {
        let output = run(&[
            "bench",
            "--transport",
            "fake",
            "--json",
            "--calls",
            "300",
            "--payload",
            payload,
            "--prefetch",
            prefetch,
            "--repeat",
            "1",
        ]);
        assert_exit(&output, 0);
        let report = json_of(&output);
        assert_eq!(report["errors"], 0, "{report}");
        assert_eq!(report["prefetch"].to_string(), prefetch, "{report}");
    }

    let output = run(&["demo", "--transport", "fake", "--json"]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["failing_call"]["error"]["type"], "ValueError");
    assert_eq!(report["workload"]["session_state_consistent"], true);
}

/// `demo --metrics-addr 127.0.0.1:0 --hold`: scrape while the demo holds, then close stdin.
#[cfg(feature = "metrics")]
#[test]
fn demo_serves_prometheus_metrics_while_it_holds() {
    let mut child = pypool()
        .args([
            "demo",
            "--workers",
            "2",
            "--json",
            "--metrics-addr",
            "127.0.0.1:0",
            "--hold",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pypool starts");
    let watchdog = Watchdog::new(&child);
    let stderr = child.stderr.take().expect("stderr is piped");
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    // Reads stderr to its end, so the demo can never block on it.
    let reader = thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut url = None;
    let mut seen = Vec::new();
    for line in lines_rx.iter() {
        seen.push(line.clone());
        if let Some(rest) = line.strip_prefix("pypool: serving metrics at ") {
            url = Some(rest.trim().to_owned());
        }
        if line.starts_with("pypool: workload done") {
            break;
        }
    }
    let url = url.unwrap_or_else(|| panic!("no metrics address on stderr: {seen:?}"));
    let body = scrape(&url);
    for expected in [
        "# TYPE pypool_calls_total counter",
        "pypool_calls_total{pool=\"demo\",outcome=\"ok\"} 201",
        "pypool_calls_total{pool=\"demo\",outcome=\"failed\"} 1",
        "pypool_call_errors_total{pool=\"demo\",kind=\"handler\"} 1",
        "pypool_worker_events_total{pool=\"demo\",event=\"launched\"} 2",
        "pypool_workers{pool=\"demo\",state=\"ready\"} 2",
        "pypool_sessions{pool=\"demo\"} 4",
        "pypool_circuit_breaker{pool=\"demo\",state=\"closed\"} 1",
        "pypool_queue_wait_seconds_count{pool=\"demo\"} 202",
        "# TYPE pypool_call_duration_seconds histogram",
        "pypool_call_duration_seconds_bucket{pool=\"demo\",le=\"+Inf\"} 201",
        "pypool_queue_wait_seconds_bucket{pool=\"demo\",le=\"+Inf\"} 202",
    ] {
        assert!(body.contains(expected), "missing {expected:?} in:\n{body}");
    }
    // Closing stdin ends the hold; the demo shuts down and prints its report.
    drop(child.stdin.take());
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout).expect("read stdout");
    }
    let status = child.wait().expect("pypool exits");
    watchdog.finish();
    let _ = reader.join();
    assert!(status.success(), "{status}\n{stdout}");
    let report: Value = serde_json::from_str(&stdout).expect("one JSON report");
    assert_eq!(report["metrics_url"], Value::from(url));
    assert_eq!(report["processes_left"], 0);
}

#[cfg(feature = "metrics")]
fn scrape(url: &str) -> String {
    let address = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .expect("an http URL");
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a read timeout");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
}

/// The interpreter with pyzmq for the zmq transport (see transport-zmq's tests): set by
/// scripts/test.sh, else the venv it creates.
#[cfg(feature = "zmq")]
fn python_with_pyzmq() -> String {
    let python = std::env::var("PYPOOL_TEST_PYTHON").unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/pyenv-test/bin/python")
            .to_string_lossy()
            .into_owned()
    });
    let has_zmq = Command::new(&python)
        .args(["-c", "import zmq"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        has_zmq,
        "the zmq CLI tests need a Python with pyzmq: `{python}` cannot import zmq; run \
         scripts/test.sh or set PYPOOL_TEST_PYTHON"
    );
    python
}

#[cfg(feature = "zmq")]
#[test]
fn demo_over_zmq_runs_and_leaves_no_process() {
    let python = python_with_pyzmq();
    let output = run(&[
        "--python",
        &python,
        "demo",
        "--transport",
        "zmq",
        "--workers",
        "2",
        "--json",
    ]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["transport"], "zmq");
    assert_eq!(report["workload"]["ok"], 201, "{report}");
    assert_eq!(report["workload"]["session_state_consistent"], true);
    assert_eq!(report["processes_left"], 0);
    for worker in report["status"]["workers"].as_array().into_iter().flatten() {
        let pid = worker["pid"].as_u64().expect("a worker pid");
        assert!(!alive(pid), "worker process {pid} outlived the demo");
    }
}

#[cfg(feature = "zmq")]
#[test]
fn bench_over_zmq_measures() {
    let python = python_with_pyzmq();
    let output = run(&[
        "--python",
        &python,
        "bench",
        "--transport",
        "zmq",
        "--json",
        "--calls",
        "200",
        "--workers",
        "2",
    ]);
    assert_exit(&output, 0);
    let report = json_of(&output);
    assert_eq!(report["transport"], "zmq");
    assert_eq!(report["errors"], 0, "{report}");
    assert_latency(&report["latency_us"], "latency_us");
}

#[cfg(feature = "zmq")]
#[test]
fn zmq_without_pyzmq_says_what_to_install() {
    // A bare interpreter without pyzmq: the start fails with the fix in the message.
    let probe = Command::new("python3")
        .args(["-c", "import zmq"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if probe.is_ok_and(|status| status.success()) {
        // This machine's python3 has pyzmq: nothing to show here; the venv runs cover the rest.
        return;
    }
    let output = run(&["demo", "--transport", "zmq", "--workers", "1"]);
    assert_exit(&output, 3);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("pip install pyzmq"),
        "{}",
        describe(&output)
    );
}
