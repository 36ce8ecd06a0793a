//! The process-tree suite: whatever a worker starts dies with it, on every way a worker ends.
//!
//! A transport crate whose workers are local processes expands [`tree_suite!`](crate::tree_suite)
//! **at the root of a test file** (the parent-death case re-runs the test binary and finds its
//! helper by name):
//!
//! ```ignore
//! struct Stdio;
//! impl pool_testkit::conformance::Target for Stdio { /* launcher */ }
//! pool_testkit::tree_suite!(Stdio);
//! ```
//!
//! Every case starts one worker, has it start three descendants — a `subprocess.Popen` child, an
//! `os.fork` child (which holds every descriptor the worker holds, its frame channel and stderr
//! included) and a child that ignores SIGTERM — and then ends the worker one way: the pool is
//! dropped, shut down, kills a hung worker, recycles it; the worker exits by itself or is
//! SIGKILLed from outside; the pool's own process is SIGKILLed or SIGTERMed. Each case proves
//! that all three descendants end within [`STEP`], that a caller whose call was in flight gets
//! the right typed error (never a timeout: the worker's exit is seen from its process, not from a
//! pipe a descendant holds), and that the pool's own children are reaped.
//!
//! Descendants are watched through pidfds opened while they are known to be alive, so the wait is
//! for exactly those processes (no pid reuse) and ends the moment they die: no polling, no sleep.
//! Linux only.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pool_core::{Error, Pool, PoolConfig, TimeoutKind};
use serde_json::json;

use crate::conformance::Target;

/// The longest any one step may take; a passing case never waits this long.
pub const STEP: Duration = Duration::from_secs(30);

/// The kinds of descendant each case starts (the conformance app's `spawn_child`).
pub const CHILD_KINDS: [&str; 3] = ["popen", "fork", "ignore_term"];

/// The environment variable that turns [`helper_pool_process`] on.
pub const HELPER_ENV: &str = "PYPOOL_TREE_HELPER";

/// The line prefix under which [`helper_pool_process`] prints its worker's and the descendants'
/// pids.
const PIDS_LINE: &str = "PYPOOL_TREE_PIDS";

/// A process this test does not own, watched through a pidfd: opened while the process is known
/// to be alive, so it keeps naming that very process even if its pid is reused.
pub struct Watched {
    /// The pid, for messages.
    pub pid: u32,
    fd: Arc<OwnedFd>,
}

impl Watched {
    /// Opens a pidfd on `pid`, which must be alive (it is, when a handler just returned it).
    pub fn open(pid: u32) -> io::Result<Watched> {
        let raw = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(io::Error::other)?;
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Watched {
            pid,
            fd: Arc::new(fd),
        })
    }

    /// Waits until the process ends; panics (naming `what`) if it is still alive after [`STEP`].
    pub async fn ended(&self, what: &str) {
        let fd = Arc::clone(&self.fd);
        let ended = tokio::task::spawn_blocking(move || wait_readable(&fd, STEP))
            .await
            .expect("the waiting thread");
        assert!(
            ended,
            "{what}: process {} is still alive {STEP:?} later",
            self.pid
        );
    }
}

/// Waits up to `timeout` for `fd` to turn readable (a pidfd does when its process terminates).
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll reads and writes the one pollfd, which outlives the call.
        let rc = unsafe { libc::poll(&mut poll, 1, millis) };
        if rc == 1 {
            return poll.revents & libc::POLLIN != 0;
        }
        // 0: timed out; -1 with EINTR: a signal woke us, wait for the rest.
        if rc == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Waits for every one of `children` to end.
pub async fn all_ended(children: &[Watched], what: &str) {
    for child in children {
        child.ended(what).await;
    }
}

/// A pool of one worker with limits that make each case quick.
pub fn config(target: &dyn Target) -> PoolConfig {
    PoolConfig::new(target.app())
        .size(1)
        .checkout_timeout(STEP)
        .call_timeout(STEP)
        .cancel_grace(Duration::from_millis(500))
        .stop_grace(Duration::from_secs(2))
        .start_timeout(Duration::from_secs(60))
}

async fn start(target: &dyn Target, config: PoolConfig) -> Pool {
    match Pool::start(config, target.launcher()).await {
        Ok(pool) => pool,
        Err(err) => panic!("pool failed to start: {err}"),
    }
}

/// The pid of the pool's only worker.
fn worker_pid(pool: &Pool) -> u32 {
    let status = pool.status();
    match status.workers.as_slice() {
        [worker] => worker.pid.expect("a local worker has a pid"),
        workers => panic!("expected one worker, got {}", workers.len()),
    }
}

/// Has the pool's worker start one descendant of each kind; returns them, watched.
pub async fn spawn_children(pool: &Pool) -> Vec<Watched> {
    let mut children = Vec::new();
    for kind in CHILD_KINDS {
        let reply = match pool.call("spawn_child", json!({ "kind": kind })).await {
            Ok(reply) => reply,
            Err(err) => panic!("spawn_child({kind}) failed: {err}"),
        };
        let pid = reply
            .value
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok())
            .unwrap_or_else(|| panic!("spawn_child({kind}) returned {}", reply.value));
        let watched =
            Watched::open(pid).unwrap_or_else(|err| panic!("pidfd for {kind} child {pid}: {err}"));
        children.push(watched);
    }
    children
}

/// Asserts that our own child `pid` is reaped (no zombie), allowing for a reap that happens in
/// the background after a kill. `/proc/<pid>` exists for a zombie, so its absence means reaped.
async fn reaped(target: &dyn Target, pid: u32) {
    let deadline = tokio::time::Instant::now() + STEP;
    let mut exits = tokio::time::interval(Duration::from_millis(5));
    while target.process_exists(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker {pid} was not reaped"
        );
        exits.tick().await;
    }
}

/// Dropping the pool without shutdown.
pub async fn dropped_pool(target: &dyn Target) {
    let pool = start(target, config(target)).await;
    let worker = worker_pid(&pool);
    let children = spawn_children(&pool).await;
    drop(pool);
    all_ended(&children, "after the pool was dropped").await;
    reaped(target, worker).await;
}

/// A graceful shutdown.
pub async fn graceful_shutdown(target: &dyn Target) {
    let pool = start(target, config(target)).await;
    let worker = worker_pid(&pool);
    let children = spawn_children(&pool).await;
    pool.shutdown(STEP).await;
    assert!(
        !target.process_exists(worker),
        "worker {worker} left after shutdown"
    );
    all_ended(&children, "after a graceful shutdown").await;
}

/// The pool kills a worker whose call overran and that did not confirm CANCEL.
pub async fn hung_worker_killed(target: &dyn Target) {
    let pool = start(
        target,
        config(target).call_timeout(Duration::from_millis(500)),
    )
    .await;
    let worker = worker_pid(&pool);
    let children = spawn_children(&pool).await;
    let worker_watch = Watched::open(worker).expect("pidfd for the worker");
    match pool.call("sleep", json!({"seconds": 300})).await {
        Err(Error::Timeout {
            kind: TimeoutKind::Call,
            ..
        }) => {}
        other => panic!("expected a call timeout, got {other:?}"),
    }
    worker_watch.ended("the hung worker").await;
    all_ended(&children, "after the pool killed a hung worker").await;
    finish(target, pool).await;
}

/// The worker is recycled after `max_calls`.
pub async fn recycled_worker(target: &dyn Target) {
    let calls = CHILD_KINDS.len() as u64;
    let pool = start(target, config(target).max_calls(calls).max_calls_jitter(0)).await;
    let worker = Watched::open(worker_pid(&pool)).expect("pidfd for the worker");
    let children = spawn_children(&pool).await;
    worker.ended("the recycled worker").await;
    all_ended(&children, "after the worker was recycled").await;
    finish(target, pool).await;
}

/// The worker exits by itself in the middle of a call.
pub async fn worker_exits_mid_call(target: &dyn Target) {
    let pool = start(target, config(target)).await;
    let children = spawn_children(&pool).await;
    match pool.call("exit", json!({"code": 3})).await {
        Err(Error::WorkerCrashed { exit, .. }) => {
            assert_eq!(exit.exit.and_then(|e| e.code), Some(3), "{exit}");
        }
        other => panic!("expected a crash with exit code 3, got {other:?}"),
    }
    all_ended(&children, "after the worker exited").await;
    finish(target, pool).await;
}

/// The worker is SIGKILLed from outside while a call runs.
pub async fn worker_sigkilled_mid_call(target: &dyn Target) {
    let pool = start(target, config(target)).await;
    let worker = worker_pid(&pool);
    let children = spawn_children(&pool).await;
    let mut stream = match pool
        .call_stream("started_then_block", json!({"seconds": 300}))
        .await
    {
        Ok(stream) => stream,
        Err(err) => panic!("started_then_block failed: {err}"),
    };
    match stream.next().await {
        Some(Ok(first)) => assert_eq!(first.value, json!("started")),
        other => panic!("expected the first item, got {other:?}"),
    }
    let pid = libc::pid_t::try_from(worker).expect("pid");
    // SAFETY: plain syscall; `worker` is our unreaped child, the pool's worker.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    match stream.next().await {
        Some(Err(Error::WorkerCrashed { exit, .. })) => {
            assert_eq!(exit.exit.and_then(|e| e.signal), Some(9), "{exit}");
        }
        other => panic!("expected a crash by signal 9, got {other:?}"),
    }
    all_ended(&children, "after the worker was SIGKILLed").await;
    reaped(target, worker).await;
    match pool.call("add", json!({"a": 1, "b": 2})).await {
        Ok(reply) => assert_eq!(reply.value, json!(3), "the replacement serves"),
        Err(err) => panic!("the pool does not serve after the crash: {err}"),
    }
    finish(target, pool).await;
}

/// A descendant that left the worker's process group (it called `setsid`, as daemons do) escapes
/// the group kill and still holds the worker's channel and stderr. The worker's death is still
/// reported at once, with its exit status, because it is seen from the process itself.
pub async fn escaped_descendant_does_not_delay_the_crash_report(target: &dyn Target) {
    let pool = start(target, config(target)).await;
    let escapee = match pool.call("spawn_child", json!({"kind": "setsid"})).await {
        Ok(reply) => reply.value.as_u64().and_then(|pid| u32::try_from(pid).ok()),
        Err(err) => panic!("spawn_child(setsid) failed: {err}"),
    }
    .expect("a pid");
    let watched = Watched::open(escapee).expect("pidfd for the escapee");
    // The call's own timeout (STEP) is far longer than it takes to see the exit: a report that
    // waited for the end of the channel would arrive as a timeout instead.
    let outcome = pool.call("exit", json!({"code": 3})).await;
    // The test owns what it started: end the escapee before asserting anything.
    let raw = libc::pid_t::try_from(escapee).expect("pid");
    // SAFETY: plain syscall; the pidfd held above keeps this pid from being reused meanwhile.
    unsafe { libc::kill(raw, libc::SIGKILL) };
    watched
        .ended("the escaped descendant, killed by the test")
        .await;
    match outcome {
        Err(Error::WorkerCrashed { exit, .. }) => {
            assert_eq!(exit.exit.and_then(|e| e.code), Some(3), "{exit}");
        }
        other => panic!("expected a crash with exit code 3, got {other:?}"),
    }
    finish(target, pool).await;
}

async fn finish(target: &dyn Target, pool: Pool) {
    let pids: Vec<u32> = pool.status().workers.iter().filter_map(|w| w.pid).collect();
    pool.shutdown(STEP).await;
    for pid in pids {
        assert!(
            !target.process_exists(pid),
            "worker {pid} left after shutdown"
        );
    }
}

/// Not a case: the "service" process of [`pool_process_killed`]. When [`HELPER_ENV`] is set it
/// starts a pool, has its worker start its descendants, prints every pid and waits to be killed;
/// otherwise it returns at once.
pub fn helper_pool_process(target: &dyn Target) {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let pool = start(target, config(target)).await;
        let worker = worker_pid(&pool);
        let children = spawn_children(&pool).await;
        let pids: Vec<String> = std::iter::once(worker)
            .chain(children.iter().map(|c| c.pid))
            .map(|pid| pid.to_string())
            .collect();
        // On a line of its own: libtest may already have printed "test ... " on this one.
        println!("\n{PIDS_LINE} {}", pids.join(" "));
        std::future::pending::<()>().await;
    });
}

/// The pool's own process dies by `signal` (SIGKILL or SIGTERM): the worker and everything it
/// started die with it. `helper` is the name of the test that runs [`helper_pool_process`].
pub async fn pool_process_killed(signal: i32, helper: &str) {
    use tokio::io::AsyncBufReadExt;

    let exe = std::env::current_exe().expect("the test binary");
    let mut service = tokio::process::Command::new(exe)
        .args(["--exact", helper, "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the helper");
    let stdout = service.stdout.take().expect("piped stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let pids: Vec<u32> = tokio::time::timeout(STEP, async {
        while let Some(line) = lines.next_line().await.expect("read the helper's output") {
            if let Some(rest) = line.strip_prefix(PIDS_LINE) {
                return rest
                    .split_whitespace()
                    .map(|pid| pid.parse().expect("a pid"))
                    .collect();
            }
        }
        panic!("the helper ended without printing its pids");
    })
    .await
    .expect("the helper did not print its pids in time");
    assert_eq!(pids.len(), 1 + CHILD_KINDS.len(), "{pids:?}");
    let watched: Vec<Watched> = pids
        .iter()
        .map(|&pid| Watched::open(pid).unwrap_or_else(|err| panic!("pidfd for {pid}: {err}")))
        .collect();
    let service_pid = service.id().expect("the helper runs");
    let raw = libc::pid_t::try_from(service_pid).expect("pid");
    // SAFETY: plain syscall on our own unreaped child.
    assert_eq!(unsafe { libc::kill(raw, signal) }, 0);
    let status = tokio::time::timeout(STEP, service.wait())
        .await
        .expect("the helper did not die")
        .expect("wait for the helper");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(signal),
        "{status}"
    );
    all_ended(&watched, "after the pool's process was killed").await;
}

/// Expands to one `#[tokio::test]` per process-tree case for `$target` (an expression whose type
/// implements [`Target`]), plus the helper test the parent-death cases run. Expand it at the root
/// of a test file.
#[macro_export]
macro_rules! tree_suite {
    ($target:expr) => {
        $crate::tree_suite!(@cases $target;
            dropped_pool,
            graceful_shutdown,
            hung_worker_killed,
            recycled_worker,
            worker_exits_mid_call,
            worker_sigkilled_mid_call,
            escaped_descendant_does_not_delay_the_crash_report,
        );

        /// Not a test on its own: the pool's process for the parent-death cases.
        #[test]
        fn tree_helper_pool_process() {
            $crate::tree::helper_pool_process(&$target);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tree_pool_process_sigkilled() {
            $crate::tree::pool_process_killed($crate::tree::libc::SIGKILL, "tree_helper_pool_process").await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tree_pool_process_sigtermed() {
            $crate::tree::pool_process_killed($crate::tree::libc::SIGTERM, "tree_helper_pool_process").await;
        }
    };
    (@cases $target:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::tree::$case(&$target).await;
            }
        )*
    };
}

/// Re-exported so the macro can name it from a transport's test file.
#[doc(hidden)]
pub use libc;
