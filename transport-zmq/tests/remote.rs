//! Remote mode: workers that join a pool over `tcp://` as separate processes, started the way an
//! operator starts them (`python -m pypool_worker --transport zmq --connect ... --secret-file
//! ...`), on 127.0.0.1. Each test owns the pool and every worker process it starts, and proves
//! they are gone at the end.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{app, pids, process_exists, remote_launcher, RemoteWorker, SecretFile, STEP};
use futures::FutureExt;
use pool_core::{Error, Pool, PoolConfig};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use transport_zmq::ZmqLauncher;

fn remote_config(size: usize) -> PoolConfig {
    PoolConfig::new(app())
        .size(size)
        .checkout_timeout(Duration::from_secs(30))
        .call_timeout(Duration::from_secs(30))
        .start_timeout(Duration::from_secs(60))
}

async fn echo(pool: &Pool, value: serde_json::Value) {
    let reply = tokio::time::timeout(STEP, pool.call("echo", json!({ "value": value.clone() })))
        .await
        .expect("the call did not finish")
        .unwrap_or_else(|err| panic!("call failed: {err}"));
    assert_eq!(reply.value, value);
}

/// Reads a worker's stderr until a line contains `needle` (the runtime logs `ready:` after
/// WELCOME); returns the lines read.
async fn wait_for_line(worker: &mut RemoteWorker, needle: &str) -> Vec<String> {
    let stderr = worker.child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(STEP, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let hit = line.contains(needle);
            seen.push(line);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "no line with {needle:?} in the worker's stderr: {seen:?}"
    );
    // Keep draining so the worker never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    seen
}

/// Shuts the pool and its launcher down, then checks every remote worker exited cleanly (the
/// pool's SHUTDOWN) and no process is left.
async fn finish(pool: Pool, launcher: &transport_zmq::ZmqLauncher, workers: Vec<RemoteWorker>) {
    pool.shutdown(Duration::from_secs(10)).await;
    pool_core::Launcher::shutdown(launcher).await;
    assert_eq!(launcher.endpoint(), None);
    for worker in workers {
        let pid = worker.pid;
        let (status, stderr) = worker.finish().await;
        assert!(
            status.success(),
            "remote worker {pid} ended with {status}: {stderr}"
        );
        assert!(!process_exists(pid), "remote worker {pid} left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_only_pool_waits_for_workers_that_join_late() {
    let secret = SecretFile::new();
    let (launcher, endpoint) = remote_launcher(&secret.key).await;
    let starting = tokio::spawn(Pool::start(remote_config(2), launcher.clone()));
    let mut first = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    wait_for_line(&mut first, "ready:").await;
    // One of two has joined: the pool waits for the other, however long it takes to come.
    let mut starting = starting;
    assert!(
        (&mut starting).now_or_never().is_none(),
        "started with one of two workers"
    );
    let second = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    let pool = tokio::time::timeout(STEP, starting)
        .await
        .expect("the pool did not start once both joined")
        .expect("join")
        .unwrap_or_else(|err| panic!("start failed: {err}"));
    let mut seen = pids(&pool);
    seen.sort_unstable();
    let mut expected = vec![first.pid, second.pid];
    expected.sort_unstable();
    assert_eq!(
        seen, expected,
        "the pool's workers are the two remote processes"
    );
    assert!(pool.status().workers.iter().all(|w| w.pid.is_some()));
    for i in 0..10 {
        echo(&pool, json!(i)).await;
    }
    finish(pool, &launcher, vec![first, second]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_remote_worker_fails_its_call_and_a_new_join_replaces_it() {
    let secret = SecretFile::new();
    let (launcher, endpoint) = remote_launcher(&secret.key).await;
    let a = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    let b = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    let config = remote_config(2)
        .ping_interval(Duration::from_millis(200))
        .ping_timeout(Duration::from_millis(200))
        .max_missed(2);
    let budget = heartbeat_budget(&config);
    let pool = Pool::start(config, launcher.clone()).await.expect("start");
    let call = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("sleep", json!({"seconds": 30})).await })
    };
    let busy = wait_for_busy_worker(&pool).await;
    let (victim, survivor) = if busy == a.pid { (a, b) } else { (b, a) };
    assert_eq!(busy, victim.pid);
    let killed_at = Instant::now();
    victim.kill();
    let err = tokio::time::timeout(STEP, call)
        .await
        .expect("the call did not fail")
        .expect("join")
        .expect_err("the call must fail");
    assert!(
        killed_at.elapsed() <= budget,
        "noticed after {:?}, budget {budget:?}",
        killed_at.elapsed()
    );
    match &err {
        Error::WorkerCrashed { exit, .. } => assert_eq!(exit.exit, None, "{err}"),
        other => panic!("expected WorkerCrashed, got {other}"),
    }
    let (status, _) = victim.finish().await;
    assert!(!status.success());
    // The pool keeps serving on the survivor, and takes a new worker that joins.
    echo(&pool, json!("still serving")).await;
    let newcomer = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    wait_for_workers(&pool, 2).await;
    assert!(
        pids(&pool).contains(&newcomer.pid),
        "the newcomer is a new worker"
    );
    assert_eq!(pool.stats().counters.crashes, 1);
    finish(pool, &launcher, vec![survivor, newcomer]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_remote_worker_is_dropped_by_missed_pings_within_the_budget() {
    let secret = SecretFile::new();
    let (launcher, endpoint) = remote_launcher(&secret.key).await;
    let a = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    let b = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    let config = remote_config(2)
        .ping_interval(Duration::from_millis(200))
        .ping_timeout(Duration::from_millis(200))
        .max_missed(2);
    let budget = heartbeat_budget(&config);
    let pool = Pool::start(config, launcher.clone()).await.expect("start");
    let call = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.call("sleep", json!({"seconds": 30})).await })
    };
    let busy = wait_for_busy_worker(&pool).await;
    let (victim, survivor) = if busy == a.pid { (a, b) } else { (b, a) };
    // Frozen, its connection stays open: only the missing PONGs tell.
    signal(victim.pid, libc::SIGSTOP);
    let stopped_at = Instant::now();
    let err = tokio::time::timeout(STEP, call)
        .await
        .expect("the call did not fail")
        .expect("join")
        .expect_err("the call must fail");
    assert!(
        stopped_at.elapsed() <= budget,
        "noticed after {:?}, budget {budget:?}",
        stopped_at.elapsed()
    );
    match &err {
        Error::WorkerCrashed { exit, .. } => {
            assert!(exit.reason.contains("missed 2 pings"), "{err}")
        }
        other => panic!("expected WorkerCrashed, got {other}"),
    }
    echo(&pool, json!("still serving")).await;
    // Woken up, it finds its connection gone and exits; a process manager would restart it
    // and it would join as a new worker.
    signal(victim.pid, libc::SIGCONT);
    let (status, stderr) = victim.finish().await;
    assert!(
        stderr.contains("channel closed"),
        "the dropped worker should see its channel close: {status} {stderr}"
    );
    finish(pool, &launcher, vec![survivor]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_wrong_secret_is_refused_and_never_served() {
    let secret = SecretFile::new();
    let wrong = SecretFile::new();
    let (launcher, endpoint) = remote_launcher(&secret.key).await;
    let good = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    let pool = Pool::start(remote_config(1), launcher.clone())
        .await
        .expect("start");
    let bad = RemoteWorker::start(&endpoint, &wrong.path, &app(), &[]);
    let (status, stderr) = bad.finish().await;
    assert!(!status.success(), "a refused worker exits with an error");
    assert!(
        stderr.contains("refused") && stderr.contains("secret"),
        "the refused worker says why: {stderr}"
    );
    assert_eq!(pids(&pool), vec![good.pid], "only the good worker serves");
    assert_eq!(launcher.waiting_workers(), 0);
    echo(&pool, json!(1)).await;
    finish(pool, &launcher, vec![good]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_tampered_and_unsigned_messages_drop_the_peer() {
    for mode in ["replay", "tamper", "unsigned"] {
        let secret = SecretFile::new();
        let (launcher, endpoint) = remote_launcher(&secret.key).await;
        let good = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
        // The rogue knows the secret, joins and says a valid HELLO: the pool takes it (and
        // may lose it before the good worker is ready, hence min_ready 1).
        let mut rogue = rogue_peer(&endpoint, &secret.path, mode);
        let pool = Pool::start(remote_config(2).min_ready(1), launcher.clone())
            .await
            .expect("start");
        let output = rogue_output(&mut rogue).await;
        assert_eq!(
            output.trim(),
            "dropped",
            "{mode}: the rogue was not dropped"
        );
        // The pool saw it go as a crash and keeps serving on the good worker.
        wait_for_counter(|| pool.stats().counters.crashes, 1).await;
        wait_for_pids(&pool, &[good.pid]).await;
        echo(&pool, json!(mode)).await;
        finish(pool, &launcher, vec![good]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_that_skips_joining_is_dropped() {
    let secret = SecretFile::new();
    let (launcher, endpoint) = remote_launcher(&secret.key).await;
    let mut rogue = rogue_peer(&endpoint, &secret.path, "stranger");
    assert_eq!(rogue_output(&mut rogue).await.trim(), "dropped");
    assert_eq!(launcher.waiting_workers(), 0);
    pool_core::Launcher::shutdown(launcher.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_beyond_the_pool_size_wait_in_the_lobby_and_replace_a_lost_worker_at_once() {
    let secret = SecretFile::new();
    let (launcher, endpoint) = remote_launcher(&secret.key).await;
    let a = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    let pool = Pool::start(remote_config(1), launcher.clone())
        .await
        .expect("start");
    let mut spare = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    // The spare has joined and said HELLO; nobody has welcomed it yet.
    wait_for_line(&mut spare, "joining").await;
    wait_for_counter(|| launcher.waiting_workers() as u64, 1).await;
    a.kill();
    let (status, _) = a.finish().await;
    assert!(!status.success());
    // The spare takes over at once: it is already there and has said HELLO.
    wait_for_pids(&pool, &[spare.pid]).await;
    assert_eq!(pool.stats().counters.crashes, 1);
    echo(&pool, json!("spare")).await;
    finish(pool, &launcher, vec![spare]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_flag_runs_a_set_that_lives_and_dies_together() {
    let secret = SecretFile::new();
    let (launcher, endpoint) = remote_launcher(&secret.key).await;
    let set = RemoteWorker::start(&endpoint, &secret.path, &app(), &["--workers", "2"]);
    let pool = Pool::start(remote_config(2), launcher.clone())
        .await
        .expect("start");
    let members = pids(&pool);
    assert_eq!(members.len(), 2);
    for pid in &members {
        assert_ne!(*pid, set.pid, "the supervisor itself is not a worker");
        assert_eq!(
            process_group(*pid),
            Some(*pid),
            "each worker leads its own group"
        );
    }
    echo(&pool, json!("set")).await;
    // One member dies: the supervisor ends the other and exits, for its process manager to
    // restart the set.
    signal(members[0], libc::SIGKILL);
    let (status, stderr) = set.finish().await;
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{stderr}");
    for pid in &members {
        wait_gone(*pid).await;
    }
    wait_for_counter(|| pool.stats().counters.crashes, 2).await;
    pool.shutdown(Duration::from_secs(5)).await;
    pool_core::Launcher::shutdown(launcher.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_the_pool_joins_once_it_listens() {
    let secret = SecretFile::new();
    // A free port nobody listens on yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let mut early = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    // It is up and trying to connect (with backoff) before the pool exists.
    wait_for_line(&mut early, "joining").await;
    let launcher = Arc::new(ZmqLauncher::remote(
        format!("127.0.0.1:{port}"),
        secret.key.clone(),
    ));
    let pool = Pool::start(remote_config(1), launcher.clone())
        .await
        .expect("start");
    assert_eq!(pids(&pool), vec![early.pid]);
    echo(&pool, json!("early")).await;
    finish(pool, &launcher, vec![early]).await;
}

/// Pins a defect of the zeromq crate: a second connection with an identity already connected
/// takes the identity over (libzmq refuses it by default). Without the secret the impostor is
/// never served, but it can cut off the worker whose identity it knows: the pool drops the
/// identity at the impostor's first (unsigned) message, and the real worker loses its
/// connection. Identities are random and not secret on the wire: anyone on the path could as
/// well cut the connection, which is why remote traffic belongs on a private network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_with_a_workers_identity_cuts_it_off_but_is_never_served() {
    let secret = SecretFile::new();
    let (launcher, endpoint) = remote_launcher(&secret.key).await;
    let mut worker = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    let lines = wait_for_line(&mut worker, "joining").await;
    let identity = lines
        .iter()
        .find_map(|line| line.split(" as ").nth(1))
        .expect("the worker logs its identity")
        .trim()
        .to_owned();
    let pool = Pool::start(remote_config(1), launcher.clone())
        .await
        .expect("start");
    echo(&pool, json!("before")).await;
    let mut impostor = rogue_peer_as(&endpoint, &secret.path, "impostor", &identity);
    assert_eq!(rogue_output(&mut impostor).await.trim(), "dropped");
    wait_for_counter(|| pool.stats().counters.crashes, 1).await;
    // Its connection is gone, so it exits (0: "channel closed"), before the pool shuts down.
    let (status, _) = worker.finish().await;
    assert!(status.success(), "{status}");
    pool.shutdown(Duration::from_secs(5)).await;
    pool_core::Launcher::shutdown(launcher.as_ref()).await;
}

// ---- helpers ---------------------------------------------------------------------------

/// The longest a busy remote worker's silence can go unnoticed: the wait for the first ping
/// and every missed one, each up to a ping interval plus the maintenance tick late.
fn heartbeat_budget(config: &PoolConfig) -> Duration {
    let late = config.ping_interval + config.maintenance_interval;
    late + config.max_missed * (config.ping_timeout + late) + Duration::from_secs(1)
}

async fn wait_for_busy_worker(pool: &Pool) -> u32 {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(pid) = pool
            .status()
            .workers
            .iter()
            .find(|w| w.in_flight > 0)
            .and_then(|w| w.pid)
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no worker became busy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_for_workers(pool: &Pool, n: usize) {
    let deadline = Instant::now() + STEP;
    while pool.status().workers.len() != n {
        assert!(
            Instant::now() < deadline,
            "the pool did not get {n} workers"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_for_pids(pool: &Pool, expected: &[u32]) {
    let deadline = Instant::now() + STEP;
    while pids(pool) != expected {
        assert!(
            Instant::now() < deadline,
            "the pool's workers are {:?}, not {expected:?}",
            pids(pool)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_for_counter(read: impl Fn() -> u64, at_least: u64) {
    let deadline = Instant::now() + STEP;
    while read() < at_least {
        assert!(
            Instant::now() < deadline,
            "the counter did not reach {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_gone(pid: u32) {
    let deadline = Instant::now() + STEP;
    while process_exists(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still there");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a process this test started.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(2)?.parse().ok()
}

fn rogue_peer(endpoint: &str, secret: &Path, mode: &str) -> tokio::process::Child {
    rogue_peer_as(endpoint, secret, mode, "")
}

fn rogue_peer_as(
    endpoint: &str,
    secret: &Path,
    mode: &str,
    identity: &str,
) -> tokio::process::Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/rogue_peer.py");
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
    tokio::process::Command::new(common::python())
        .arg(script)
        .arg(endpoint)
        .arg(secret)
        .arg(mode)
        .arg(identity)
        .env("PYTHONPATH", package)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the rogue peer")
}

async fn rogue_output(rogue: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = String::new();
    let mut stdout = rogue.stdout.take().expect("piped");
    tokio::time::timeout(STEP, stdout.read_to_string(&mut out))
        .await
        .expect("the rogue did not finish")
        .expect("read");
    let status = tokio::time::timeout(STEP, rogue.wait())
        .await
        .expect("the rogue did not exit")
        .expect("wait");
    assert!(status.success(), "rogue: {status}: {out}");
    out
}
