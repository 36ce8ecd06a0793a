//! A same-user client flooding the pool's socket with silent connections must never delay or
//! stop a worker's replacement, nor exhaust the pool's descriptors, nor leave the socket behind.
//!
//! Its own test binary: it lowers this process's descriptor limit.
#![cfg(unix)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pool_core::Pool;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use transport_ipc::IpcLauncher;

/// More connections than this process may hold descriptors.
const FLOOD: usize = 1100;
const FD_LIMIT: u64 = 512;

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_delays_no_replacement() {
    let limit = libc::rlimit {
        rlim_cur: FD_LIMIT,
        rlim_max: FD_LIMIT.max(limit_max()),
    };
    // SAFETY: setrlimit reads the struct, which outlives the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);

    // Authentication may take long, so a replacement that had to wait behind the flood would
    // miss the checkout deadline below by far.
    let launcher = Arc::new(IpcLauncher::new().auth_timeout(Duration::from_secs(60)));
    let config = config(1).checkout_timeout(Duration::from_secs(20));
    let pool = Pool::start(config, launcher.clone()).await.expect("start");
    let socket = launcher.socket_path().expect("listening");

    let client = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/apps/flood_client.py");
    let mut flood = tokio::process::Command::new("python3")
        .arg(&client)
        .arg(&socket)
        .arg(FLOOD.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the flood");
    let stdout = flood.stdout.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(STEP, lines.next_line())
        .await
        .expect("the flood did not start in time")
        .expect("read");
    assert_eq!(line.as_deref(), Some("flooding"));

    // Crash the only worker: its replacement must connect through the flood.
    for round in 0..3 {
        let victim = *pids(&pool).iter().next().expect("a worker");
        match pool.call("kill_self", json!({})).await {
            Err(pool_core::Error::WorkerCrashed { .. }) => {}
            other => panic!("expected the worker to crash, got {other:?}"),
        }
        let reply = pool
            .call("add", json!({"a": round, "b": 1}))
            .await
            .unwrap_or_else(|err| panic!("round {round}: no replacement served: {err}"));
        assert_eq!(reply.value, json!(round + 1));
        assert!(!pids(&pool).contains(&victim));
        assert!(
            open_descriptors() < FD_LIMIT as usize / 2,
            "the pool holds {} descriptors under the flood",
            open_descriptors()
        );
    }
    let stats = pool.stats();
    assert_eq!(stats.counters.launch_failures, 0, "{stats:?}");

    pool.shutdown(Duration::from_secs(10)).await;
    assert!(!socket.exists(), "the socket is left behind");
    assert!(
        !socket.parent().expect("its directory").exists(),
        "the socket's directory is left behind"
    );
    flood.kill().await.expect("stop the flood");
}

fn limit_max() -> u64 {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct, which outlives the call.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) };
    current.rlim_max
}
