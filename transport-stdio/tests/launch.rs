//! The stdio launcher against real Python workers.

mod common;

use std::io::Read;
use std::path::PathBuf;

use bytes::Bytes;
use common::*;
use pool_core::protocol::{Message, PROTOCOL_VERSION};
use pool_core::{Launcher, ProcessHandle};
use pool_process::RUNTIME_VERSION;
use serde_json::json;
use transport_stdio::StdioLauncher;

#[tokio::test]
async fn handshake_and_echo_with_bytes() {
    let launcher = StdioLauncher::new();
    assert_eq!(launcher.name(), "stdio");
    let spec = spec(conformance_app());
    let mut launched = launcher.launch(&spec).await.expect("launch");
    let process = launched.process.take().expect("a process handle");
    let pid = process.pid().expect("a pid");
    assert_eq!(process.try_exit(), None);

    let hello = handshake(&mut launched.channel, &spec).await;
    assert_eq!(hello.protocol, PROTOCOL_VERSION);
    assert_eq!(hello.pid, u64::from(pid));
    assert_eq!(hello.worker_id, spec.worker_id);
    assert_eq!(hello.runtime, format!("pypool_worker/{RUNTIME_VERSION}"));
    assert!(hello.commands.iter().any(|c| c == "echo"), "{hello:?}");

    let blob: Bytes = (0..=255u8)
        .cycle()
        .take(100_000)
        .collect::<Vec<u8>>()
        .into();
    let args = json!({"value": {"data": {"__pypool_att__": 0}, "n": 7}});
    let (ok, attachments) = call(
        &mut launched.channel,
        1,
        "echo",
        args,
        std::slice::from_ref(&blob),
    )
    .await;
    assert_eq!(ok, json!({"data": {"__pypool_att__": 0}, "n": 7}));
    assert_eq!(attachments, vec![blob]);

    // Stray writes to stdout must not corrupt the frame stream.
    let (ok, _) = call(&mut launched.channel, 2, "noisy", json!(["quiet"]), &[]).await;
    assert_eq!(ok, json!("quiet"));

    assert!(process.rss_bytes().is_some_and(|rss| rss > 1024 * 1024));

    send(&mut launched.channel, &Message::Shutdown, &[]).await;
    match recv(&mut launched.channel).await {
        Some((Message::Goodbye, _)) => {}
        other => panic!("expected GOODBYE, got {other:?}"),
    }
    let exit = tokio::time::timeout(STEP, process.wait())
        .await
        .expect("exit");
    assert_eq!(exit.code, Some(0), "{exit}");
    assert_eq!(process.try_exit(), Some(exit));
    assert_eq!(process.rss_bytes(), None);
    assert!(!proc_exists(pid), "worker {pid} was not reaped");
    // Signals after the reap are no-ops.
    process.terminate();
    process.kill();
    assert_eq!(process.wait().await, exit);
}

#[tokio::test]
async fn interpreter_is_resolved_to_the_real_binary() {
    let launcher = StdioLauncher::new();
    let spec = spec(stdio_app());
    let interpreter = launcher
        .processes()
        .interpreter(&spec)
        .await
        .expect("resolve python3");
    assert_eq!(interpreter.requested, PathBuf::from("python3"));
    assert!(interpreter.version.starts_with("3."), "{interpreter:?}");
    assert!(interpreter.executable.is_absolute(), "{interpreter:?}");
    // A real executable, not a shell-script shim such as pyenv's.
    let mut magic = [0u8; 4];
    std::fs::File::open(&interpreter.executable)
        .and_then(|mut f| f.read_exact(&mut magic))
        .expect("read the interpreter");
    assert_eq!(&magic, b"\x7fELF", "{interpreter:?} is not a binary");
    // Cached: the same answer without running Python again.
    assert_eq!(
        launcher
            .processes()
            .interpreter(&spec)
            .await
            .expect("cached"),
        interpreter
    );

    let (mut channel, process) = launcher.launch_process(&spec).await.expect("launch");
    handshake(&mut channel, &spec).await;
    // The worker process is that binary, not a shell running it.
    let exe =
        std::fs::read_link(format!("/proc/{}/exe", process.pid().expect("pid"))).expect("exe");
    let expected = std::fs::canonicalize(&interpreter.executable).expect("canonicalize");
    assert_eq!(exe, expected);
    let (ok, _) = call(&mut channel, 1, "executable", json!([]), &[]).await;
    assert_eq!(ok, json!(interpreter.executable.to_string_lossy()));

    // The runtime comes from the embedded copy unless the interpreter has the same version.
    let (ok, _) = call(&mut channel, 2, "runtime_file", json!([]), &[]).await;
    let file = PathBuf::from(ok.as_str().expect("a path"));
    if !interpreter.has_matching_runtime() {
        let dir = pool_process::materialize_runtime().expect("materialize");
        assert!(file.starts_with(&dir), "{file:?} not in {dir:?}");
    }
    process.kill();
    let exit = tokio::time::timeout(STEP, process.wait())
        .await
        .expect("exit");
    assert_eq!(exit.signal, Some(9));
}

#[tokio::test]
async fn environment_and_working_directory() {
    let launcher = StdioLauncher::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = spec(stdio_app());
    spec.cwd = Some(dir.path().to_path_buf());
    spec.env.insert("OMP_NUM_THREADS".into(), "4".into());
    spec.env.insert("PYPOOL_TEST_VALUE".into(), "hello".into());
    let (mut channel, process) = launcher.launch_process(&spec).await.expect("launch");
    handshake(&mut channel, &spec).await;

    let names = [
        "PYPOOL_WORKER_ID",
        "PYTHONUNBUFFERED",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "PYPOOL_TEST_VALUE",
    ];
    let (env, _) = call(&mut channel, 1, "environment", json!([names]), &[]).await;
    assert_eq!(env["PYPOOL_WORKER_ID"], json!(spec.worker_id));
    assert_eq!(env["PYTHONUNBUFFERED"], json!("1"));
    assert_eq!(env["OMP_NUM_THREADS"], json!("4"));
    assert_eq!(env["PYPOOL_TEST_VALUE"], json!("hello"));
    for name in &names[3..7] {
        // The pool's own setting wins over the default of 1.
        let expected = std::env::var(name).unwrap_or_else(|_| "1".to_owned());
        assert_eq!(env[*name], json!(expected), "{name}");
    }
    let (cwd, _) = call(&mut channel, 2, "cwd", json!([]), &[]).await;
    let expected = std::fs::canonicalize(dir.path()).expect("canonicalize");
    assert_eq!(PathBuf::from(cwd.as_str().expect("a path")), expected);

    // End-of-file on stdin: the pool is done with the worker, which takes its process group
    // (everything it started, itself included) down.
    drop(channel);
    let exit = tokio::time::timeout(STEP, process.wait())
        .await
        .expect("exit");
    assert_eq!(exit.signal, Some(9), "{exit}");
}

#[tokio::test]
async fn dropping_launched_kills_and_reaps() {
    let launcher = StdioLauncher::new();
    let spec = spec(conformance_app());
    let (mut channel, process) = launcher.launch_process(&spec).await.expect("launch");
    handshake(&mut channel, &spec).await;
    let pid = process.pid().expect("pid");
    assert!(proc_exists(pid));
    let exited = process.exited();
    let launched = pool_core::Launched {
        channel,
        process: Some(Box::new(process)),
    };
    drop(launched);
    let exit = tokio::time::timeout(STEP, exited).await.expect("exit");
    assert_eq!(exit.signal, Some(9), "{exit}");
    // Reaped: no zombie left behind.
    assert!(!proc_exists(pid), "worker {pid} is still in /proc");
}

#[tokio::test]
async fn stderr_tail_and_exit_code() {
    let launcher = StdioLauncher::new();
    let spec = spec(conformance_app());
    let (mut channel, process) = launcher.launch_process(&spec).await.expect("launch");
    handshake(&mut channel, &spec).await;
    call(&mut channel, 1, "noisy", json!(["x"]), &[]).await;
    call_only(
        &mut channel,
        2,
        "stderr_then_exit",
        json!([3, "last words before exit"]),
        &[],
    )
    .await;
    // No reply: the worker is gone, and the channel ends.
    assert!(recv(&mut channel).await.is_none());
    let exit = tokio::time::timeout(STEP, process.wait())
        .await
        .expect("exit");
    assert_eq!(exit.code, Some(3), "{exit}");
    assert_eq!(exit.signal, None);
    assert_eq!(process.try_exit(), Some(exit));
    let tail = process.stderr_tail();
    assert_eq!(
        tail.last().map(String::as_str),
        Some("last words before exit"),
        "{tail:?}"
    );
    // What `noisy` printed to stdout went to stderr instead.
    assert!(tail.iter().any(|line| line == "noise"), "{tail:?}");
    assert!(tail.len() <= spec.stderr_tail_lines);
    assert!(!proc_exists(process.pid().expect("pid")));
}

#[tokio::test]
async fn stderr_tail_is_bounded() {
    let launcher = StdioLauncher::new();
    let mut spec = spec(conformance_app());
    spec.stderr_tail_lines = 2;
    let (mut channel, process) = launcher.launch_process(&spec).await.expect("launch");
    handshake(&mut channel, &spec).await;
    call(&mut channel, 1, "noisy", json!(["x"]), &[]).await;
    call_only(&mut channel, 2, "stderr_then_exit", json!([5, "bye"]), &[]).await;
    let exit = tokio::time::timeout(STEP, process.wait())
        .await
        .expect("exit");
    assert_eq!(exit.code, Some(5));
    let tail = process.stderr_tail();
    assert_eq!(tail.len(), 2, "{tail:?}");
    assert_eq!(tail[1], "bye");
}

#[tokio::test]
async fn sigkill_reports_signal_9() {
    let launcher = StdioLauncher::new();
    let spec = spec(conformance_app());
    let (mut channel, process) = launcher.launch_process(&spec).await.expect("launch");
    handshake(&mut channel, &spec).await;
    call_only(&mut channel, 1, "kill_self", json!([]), &[]).await;
    // Several waiters at once, and a cancelled one, all fine.
    let cancelled = tokio::time::timeout(std::time::Duration::ZERO, process.wait()).await;
    assert!(cancelled.is_err());
    let (a, b) = tokio::join!(process.wait(), process.wait());
    assert_eq!(a, b);
    assert_eq!(a.signal, Some(9), "{a}");
    assert_eq!(a.code, None);
    assert_eq!(a.to_string(), "signal 9");
}

#[tokio::test]
async fn terminate_stops_the_worker() {
    let launcher = StdioLauncher::new();
    let spec = spec(conformance_app());
    let (mut channel, process) = launcher.launch_process(&spec).await.expect("launch");
    handshake(&mut channel, &spec).await;
    process.terminate();
    let exit = tokio::time::timeout(STEP, process.wait())
        .await
        .expect("exit");
    // The runtime exits 0 on SIGTERM; a runtime without a handler dies of the signal.
    assert!(exit.code == Some(0) || exit.signal == Some(15), "{exit}");
}

#[tokio::test]
async fn missing_interpreter_is_a_clear_error() {
    let launcher = StdioLauncher::new();

    let mut spec = spec(conformance_app());
    spec.python = PathBuf::from("/nonexistent/bin/python3");
    let err = launcher.launch(&spec).await.expect_err("must fail");
    assert!(err.message.contains("not found"), "{err}");
    assert!(err.message.contains("/nonexistent/bin/python3"), "{err}");

    spec.python = PathBuf::from("pypool-no-such-python-anywhere");
    let err = launcher.launch(&spec).await.expect_err("must fail");
    assert!(err.message.contains("not found in PATH"), "{err}");

    // Something that runs but is not Python.
    spec.python = PathBuf::from("true");
    let err = launcher.launch(&spec).await.expect_err("must fail");
    assert!(
        err.message
            .contains("is not a working Python 3 interpreter"),
        "{err}"
    );
}

#[tokio::test]
async fn startup_error_reaches_the_channel() {
    let launcher = StdioLauncher::new();
    let spec = spec(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/apps/missing_app.py"));
    let (mut channel, process) = launcher.launch_process(&spec).await.expect("launch");
    match recv(&mut channel).await {
        Some((Message::StartupError { error }, _)) => {
            assert!(error.message.contains("missing_app.py"), "{error:?}")
        }
        other => panic!("expected STARTUP_ERROR, got {other:?}"),
    }
    let exit = tokio::time::timeout(STEP, process.wait())
        .await
        .expect("exit");
    assert!(exit.code.is_some_and(|code| code != 0), "{exit}");
}
