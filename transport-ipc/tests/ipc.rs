//! ipc-specific behaviour with real Python workers: authentication against rogue local clients,
//! large payloads, the socket's permissions and removal, pools side by side, and launches whose
//! worker never connects.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use pool_core::protocol::{Hello, Message};
use pool_core::{
    ExitInfo, LaunchError, Launched, Launcher, Payload, Pool, ProcessHandle, WorkerSpec,
};
use serde_json::json;
use tokio::sync::oneshot;
use transport_ipc::IpcLauncher;

fn ok(result: pool_core::Result<Payload>) -> Payload {
    match result {
        Ok(payload) => payload,
        Err(err) => panic!("call failed: {err}"),
    }
}

async fn start(launcher: Arc<dyn Launcher>, size: usize) -> Pool {
    match Pool::start(config(size), launcher).await {
        Ok(pool) => pool,
        Err(err) => panic!("pool failed to start: {err}"),
    }
}

/// Shuts the pool down and checks that no worker process and no socket file is left.
async fn finish(pool: Pool, socket: &Path) {
    let pids = pids(&pool);
    pool.shutdown(Duration::from_secs(10)).await;
    for pid in pids {
        assert!(!process_exists(pid), "worker {pid} left behind");
    }
    assert_gone(socket);
}

fn assert_gone(socket: &Path) {
    assert!(!socket.exists(), "{} left behind", socket.display());
    let dir = socket.parent().expect("the socket has a directory");
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// The pids that answer `pid` calls, made concurrently.
async fn answering_pids(pool: &Pool, calls: usize) -> BTreeSet<u32> {
    let replies = futures::future::join_all((0..calls).map(|_| pool.call("pid", json!({})))).await;
    replies
        .into_iter()
        .map(|reply| {
            let value = ok(reply).value;
            let pid = value
                .as_u64()
                .unwrap_or_else(|| panic!("pid reply {value}"));
            u32::try_from(pid).expect("a pid fits in u32")
        })
        .collect()
}

fn hello_without_auth() -> Message {
    Message::Hello(Hello {
        protocol: 1,
        runtime: "rogue/0".to_owned(),
        python: "3".to_owned(),
        pid: u64::from(std::process::id()),
        worker_id: "w0".to_owned(),
        codecs: vec!["json".to_owned()],
        commands: vec!["echo".to_owned()],
        max_in_flight: 1,
        features: Vec::new(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_clients_are_closed_at_once_and_the_pool_keeps_serving() {
    let launcher = Arc::new(IpcLauncher::new().auth_timeout(Duration::from_secs(600)));
    let socket = launcher.listen().expect("listen");

    // Strangers (no launch waits for their pid) are closed before any challenge, whatever they
    // do: connect and stay silent, send HELLO at once, send bytes that are not a frame.
    let mut silent = RawClient::connect(&socket).await;
    let mut hello = RawClient::connect_and_send(&socket, &hello_without_auth()).await;
    let mut garbage = RawClient::connect_and_write(&socket, b"GET / HTTP/1.0\r\n\r\n").await;
    silent.expect_closed().await;
    hello.expect_closed().await;
    garbage.expect_closed().await;

    let pool = start(launcher.clone(), 2).await;
    assert_only_launched_workers(&pool, 2);
    assert_eq!(answering_pids(&pool, 8).await, pids(&pool));

    // And while the pool runs.
    let mut hello_again = RawClient::connect_and_send(&socket, &hello_without_auth()).await;
    hello_again.expect_closed().await;

    assert_eq!(
        ok(pool.call("add", json!({"a": 40, "b": 2})).await).value,
        json!(42)
    );
    assert_only_launched_workers(&pool, 2);
    let stats = pool.stats();
    assert_eq!(stats.counters.launches, 2, "{stats:?}");
    assert_eq!(stats.counters.launch_failures, 0, "{stats:?}");
    finish(pool, &socket).await;
    assert_eq!(launcher.socket_path(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launched_worker_that_stays_silent_fails_its_launch_at_the_auth_deadline() {
    let fake = FakeRuntime::new(CONNECTS_SILENTLY);
    let auth_timeout = Duration::from_millis(300);
    // The connect timeout is far away: the failure must come from the auth deadline.
    let launcher = IpcLauncher::new()
        .auth_timeout(auth_timeout)
        .connect_timeout(Duration::from_secs(600));
    let err = tokio::time::timeout(STEP, launcher.launch(&fake.spec("w-silent")))
        .await
        .expect("the launch waited for the connect timeout")
        .expect_err("the launch must fail");
    assert!(err.message.contains("authentication failed"), "{err}");
    assert!(!process_exists(fake_pid(&err.stderr_tail)));
    let socket = launcher.socket_path().expect("listening");
    launcher.shutdown().await;
    assert_gone(&socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_of_64_mib_travel_both_ways() {
    let launcher = Arc::new(IpcLauncher::new());
    let pool = start(launcher.clone(), 1).await;
    let socket = launcher.socket_path().expect("listening");
    let size = 64 * 1024 * 1024;
    let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    let mut args = Payload::new(json!({}));
    let placeholder = args.attach(Bytes::from(data.clone()));
    args.value["value"] = placeholder;
    let reply = ok(pool.call("echo", args).await);
    let back = reply.as_bytes().expect("bytes back");
    assert_eq!(back.len(), size);
    assert!(back[..] == data[..], "the 64 MiB echo differs");
    finish(pool, &socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_and_removed_on_shutdown() {
    let launcher = Arc::new(IpcLauncher::new());
    assert_eq!(launcher.socket_path(), None, "listening before first use");
    let pool = start(launcher.clone(), 1).await;
    let socket = launcher.socket_path().expect("listening");
    let dir = socket.parent().expect("a directory").to_path_buf();

    let uid = unsafe { libc::geteuid() };
    let dir_meta = std::fs::symlink_metadata(&dir).expect("dir metadata");
    assert!(dir_meta.is_dir());
    assert_eq!(dir_meta.permissions().mode() & 0o7777, 0o700);
    assert_eq!(dir_meta.uid(), uid);
    let socket_meta = std::fs::symlink_metadata(&socket).expect("socket metadata");
    assert!(socket_meta.file_type().is_socket());
    assert_eq!(socket_meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(socket_meta.uid(), uid);
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("read dir")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(
        entries,
        ["pool.sock"],
        "the directory holds the socket alone"
    );

    ok(pool.call("echo", json!({"value": 1})).await);
    finish(pool, &socket).await;
    assert_eq!(launcher.socket_path(), None);

    // The launcher listens again, on a fresh socket, if it is used after shutdown.
    let again = launcher.listen().expect("listen again");
    assert_ne!(again, socket);
    assert!(again.exists());
    launcher.shutdown().await;
    assert_gone(&again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_launcher_removes_the_socket() {
    let launcher = IpcLauncher::new();
    let socket = launcher.listen().expect("listen");
    assert!(socket.exists());
    drop(launcher);
    assert_gone(&socket);
}

type Exit = Pin<Box<dyn Future<Output = ExitInfo> + Send>>;

/// An ipc launcher that reports when it is dropped and keeps a future for each worker's exit
/// (one that resolves once the worker has been reaped, even after its handle is gone).
struct Tracked {
    launcher: IpcLauncher,
    exits: Arc<Mutex<Vec<Exit>>>,
    // Declared after `launcher`, so dropped after it: when the receiver sees this sender go, the
    // launcher's Drop has run.
    _dropped: oneshot::Sender<()>,
}

#[async_trait]
impl Launcher for Tracked {
    fn name(&self) -> &str {
        self.launcher.name()
    }

    async fn launch(&self, spec: &WorkerSpec) -> Result<Launched, LaunchError> {
        let (channel, process) = self.launcher.launch_process(spec).await?;
        let exit: Exit = Box::pin(process.exited());
        self.exits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(exit);
        Ok(Launched {
            channel,
            process: Some(Box::new(process)),
        })
    }

    async fn shutdown(&self) {
        self.launcher.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_pool_removes_the_socket_and_every_worker() {
    let (dropped_tx, dropped) = oneshot::channel();
    let exits = Arc::new(Mutex::new(Vec::new()));
    let tracked = Arc::new(Tracked {
        launcher: IpcLauncher::new(),
        exits: Arc::clone(&exits),
        _dropped: dropped_tx,
    });
    let pool = start(tracked.clone(), 2).await;
    let socket = tracked.launcher.socket_path().expect("listening");
    drop(tracked);
    ok(pool.call("echo", json!({"value": 1})).await);
    let seen = pids(&pool);
    assert_eq!(seen.len(), 2);

    drop(pool);
    // The pool's tasks end and drop the launcher, which removes the socket synchronously.
    let result = tokio::time::timeout(STEP, dropped)
        .await
        .expect("the launcher was not dropped");
    assert!(result.is_err(), "the sender is only ever dropped");
    assert_gone(&socket);
    // Every worker was killed and reaped.
    let exits: Vec<Exit> = std::mem::take(&mut *exits.lock().unwrap_or_else(|p| p.into_inner()));
    assert_eq!(exits.len(), 2);
    for exit in exits {
        tokio::time::timeout(STEP, exit)
            .await
            .expect("a worker survived the pool's drop");
    }
    for pid in seen {
        assert!(!process_exists(pid), "worker {pid} left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_side_by_side_never_share_a_socket_or_a_worker() {
    let first = Arc::new(IpcLauncher::new());
    let second = Arc::new(IpcLauncher::new());
    let (a, b) = tokio::join!(start(first.clone(), 2), start(second.clone(), 2));
    let socket_a = first.socket_path().expect("a listens");
    let socket_b = second.socket_path().expect("b listens");
    assert_ne!(socket_a, socket_b);
    assert_ne!(socket_a.parent(), socket_b.parent());

    let (answered_a, answered_b) = tokio::join!(answering_pids(&a, 8), answering_pids(&b, 8));
    assert_eq!(answered_a, pids(&a));
    assert_eq!(answered_b, pids(&b));
    assert!(answered_a.is_disjoint(&answered_b));
    assert_only_launched_workers(&a, 2);
    assert_only_launched_workers(&b, 2);

    // Shutting one down leaves the other serving.
    finish(a, &socket_a).await;
    assert!(socket_b.exists());
    assert_eq!(
        ok(b.call("add", json!({"a": 1, "b": 2})).await).value,
        json!(3)
    );
    finish(b, &socket_b).await;
}

/// A pid that no process has: one that ran and was reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = child.id();
    child.wait().expect("reap");
    pid
}

/// A directory like the one a pool with pid `owner` makes, holding a socket nobody listens on.
fn stale_dir(base: &Path, owner: u32, suffix: &str) -> PathBuf {
    let dir = base.join(format!("pypool-ipc-{owner}-{suffix}"));
    std::fs::create_dir(&dir).expect("mkdir");
    drop(std::os::unix::net::UnixListener::bind(dir.join("pool.sock")).expect("bind stale"));
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_directories_of_dead_pools_are_removed_and_nothing_else() {
    let base = tempfile::tempdir().expect("tempdir");
    let dead = dead_pid();
    // What a SIGKILLed pool leaves: its private directory with a socket nobody listens on.
    let stale = stale_dir(base.path(), dead, "00000000000000aa");
    // Its owner is alive (this process stands in for another live pool).
    let live_owner = stale_dir(base.path(), std::process::id(), "00000000000000bb");
    // Something else lives in it.
    let not_only_ours = stale_dir(base.path(), dead, "00000000000000cc");
    std::fs::write(not_only_ours.join("notes.txt"), "keep").expect("write");
    // Its owner pid is dead here, but something still listens (a pool in another pid namespace).
    let listening = stale_dir(base.path(), dead, "00000000000000dd");
    std::fs::remove_file(listening.join("pool.sock")).expect("rm");
    let listener =
        std::os::unix::net::UnixListener::bind(listening.join("pool.sock")).expect("bind live");
    // Not our naming scheme.
    let foreign = stale_dir(base.path(), dead, "not-hex");

    let launcher = Arc::new(IpcLauncher::new().socket_dir(base.path()));
    let pool = start(launcher.clone(), 1).await;
    let socket = launcher.socket_path().expect("listening");
    assert!(socket.starts_with(base.path()));
    ok(pool.call("echo", json!({"value": 1})).await);
    finish(pool, &socket).await;

    assert!(!stale.exists(), "the dead pool's directory is still there");
    for kept in [&live_owner, &not_only_ours, &listening, &foreign] {
        assert!(
            kept.join("pool.sock").exists(),
            "{} was removed",
            kept.display()
        );
    }
    drop(listener);
}

const EXITS_AT_ONCE: &str = r#"
import os, sys
sys.stderr.write("fake runtime pid %d: refusing to connect\n" % os.getpid())
sys.exit(7)
"#;

const NEVER_CONNECTS: &str = r#"
import os, sys, time
sys.stderr.write("fake runtime pid %d: not connecting\n" % os.getpid())
sys.stderr.flush()
time.sleep(3600)
"#;

/// Reads its secret, connects, and never says a word.
const CONNECTS_SILENTLY: &str = r#"
import os, socket, sys, time
fd = int(os.environ["PYPOOL_SECRET_FD"])
while os.read(fd, 4096):
    pass
sys.stderr.write("fake runtime pid %d: connecting, then silent\n" % os.getpid())
sys.stderr.flush()
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(os.environ["PYPOOL_IPC_PATH"])
time.sleep(3600)
"#;

/// Connects, answers the challenge with a wrong HMAC, and waits for the pool to hang up.
const WRONG_SECRET: &str = r#"
import hashlib, hmac, json, os, socket, struct, sys

def frame(header):
    head = json.dumps(header).encode()
    body = b"J" + struct.pack(">I", len(head)) + head
    return struct.pack(">I", len(body)) + body

def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data

sys.stderr.write("fake runtime pid %d: answering with the wrong key\n" % os.getpid())
sys.stderr.flush()
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(os.environ["PYPOOL_IPC_PATH"])
length = struct.unpack(">I", read_exact(sock, 4))[0]
body = read_exact(sock, length)
header_len = struct.unpack(">I", body[1:5])[0]
nonce = json.loads(body[5:5 + header_len])["nonce"]
mac = hmac.new(b"wrong key", nonce.encode(), hashlib.sha256).hexdigest()
sock.sendall(frame({"type": "auth", "mac": mac}))
while sock.recv(4096):
    pass
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_before_connecting_fails_its_launch_with_stderr() {
    let fake = FakeRuntime::new(EXITS_AT_ONCE);
    let launcher = IpcLauncher::new();
    let err = tokio::time::timeout(STEP, launcher.launch(&fake.spec("w-exit")))
        .await
        .expect("the launch hung")
        .expect_err("the launch must fail");
    assert!(
        err.message
            .contains("exited (exit code 7) before connecting"),
        "{err}"
    );
    assert!(
        err.stderr_tail
            .iter()
            .any(|l| l.contains("refusing to connect")),
        "{err}"
    );
    assert!(!process_exists(fake_pid(&err.stderr_tail)));
    let socket = launcher.socket_path().expect("listening");
    launcher.shutdown().await;
    assert_gone(&socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_connects_is_killed_at_the_connect_timeout() {
    let fake = FakeRuntime::new(NEVER_CONNECTS);
    let launcher = IpcLauncher::new().connect_timeout(Duration::from_millis(500));
    let err = tokio::time::timeout(STEP, launcher.launch(&fake.spec("w-silent")))
        .await
        .expect("the launch hung")
        .expect_err("the launch must fail");
    assert!(err.message.contains("did not connect"), "{err}");
    assert!(
        err.stderr_tail.iter().any(|l| l.contains("not connecting")),
        "{err}"
    );
    // The launch killed and reaped it before failing.
    assert!(!process_exists(fake_pid(&err.stderr_tail)));
    let socket = launcher.socket_path().expect("listening");
    launcher.shutdown().await;
    assert_gone(&socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_the_wrong_secret_fails_its_launch_at_once() {
    let fake = FakeRuntime::new(WRONG_SECRET);
    // The connect timeout is far away: the failure must come from the rejected AUTH.
    let launcher = IpcLauncher::new().connect_timeout(Duration::from_secs(600));
    let err = tokio::time::timeout(STEP, launcher.launch(&fake.spec("w-wrong")))
        .await
        .expect("the launch waited for the connect timeout")
        .expect_err("the launch must fail");
    assert!(err.message.contains("wrong HMAC"), "{err}");
    assert!(!process_exists(fake_pid(&err.stderr_tail)));
    let socket = launcher.socket_path().expect("listening");
    launcher.shutdown().await;
    assert_gone(&socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_is_neither_in_argv_nor_in_the_environment() {
    let launcher = IpcLauncher::new();
    let spec = WorkerSpec::new("ipc-argv", "w0", app());
    let (channel, process) = launcher.launch_process(&spec).await.expect("launch");
    let pid = process.pid().expect("pid");
    let cmdline = cmdline(pid);
    assert!(cmdline.contains("--transport ipc"), "{cmdline}");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let environ: Vec<String> = environ
        .split(|&b| b == 0)
        .map(|var| String::from_utf8_lossy(var).into_owned())
        .collect();
    assert!(
        environ
            .iter()
            .any(|var| var.starts_with("PYPOOL_IPC_PATH=")),
        "{environ:?}"
    );
    // The secret is 64 hex digits: no argument and no variable may hold such a value.
    let secret_like =
        |value: &str| value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit());
    for arg in cmdline.split(' ') {
        assert!(
            !secret_like(arg),
            "argv holds a secret-like value: {cmdline}"
        );
    }
    for var in &environ {
        let value = var.split_once('=').map_or("", |(_, value)| value);
        assert!(
            !secret_like(value),
            "the environment holds a secret-like value: {var}"
        );
    }
    drop(channel);
    process.kill();
    process.wait().await;
    assert!(!process_exists(pid));
    let socket: PathBuf = launcher.socket_path().expect("listening");
    launcher.shutdown().await;
    assert_gone(&socket);
}
