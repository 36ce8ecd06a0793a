//! Helpers shared by the ipc integration tests: the conformance app, pool configs, a raw client
//! that speaks (or refuses to speak) the protocol by hand, and process checks.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use pool_core::protocol::{channel_from_io, decode, encode, Codec, Message};
use pool_core::{Channel, Pool, PoolConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// Upper bound for any single step; a hang fails the test instead of blocking the suite.
pub const STEP: Duration = Duration::from_secs(60);

pub fn app() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../pool-testkit/apps/conformance_app.py")
        .to_string_lossy()
        .into_owned()
}

pub fn config(size: usize) -> PoolConfig {
    PoolConfig::new(app())
        .size(size)
        .checkout_timeout(Duration::from_secs(30))
        .call_timeout(Duration::from_secs(30))
        .start_timeout(Duration::from_secs(60))
}

pub fn pids(pool: &Pool) -> BTreeSet<u32> {
    pool.status().workers.iter().filter_map(|w| w.pid).collect()
}

/// Whether the process exists (a zombie counts: it was not reaped).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The parent pid of a live process.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The command line of a live process, arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Asserts that every pool worker is a child of this test process running the ipc runtime.
pub fn assert_only_launched_workers(pool: &Pool, expected: usize) {
    let status = pool.status();
    assert_eq!(status.workers.len(), expected, "{status:?}");
    let me = std::process::id();
    for worker in &status.workers {
        let pid = worker.pid.expect("a launched worker has a pid");
        assert_ne!(pid, me, "this test process became a worker");
        assert_eq!(parent_of(pid), Some(me), "worker {pid} is not our child");
        let cmdline = cmdline(pid);
        assert!(
            cmdline.contains("pypool_worker") && cmdline.contains("--transport ipc"),
            "worker {pid} runs `{cmdline}`"
        );
    }
}

/// A local client that talks to the pool's socket by hand.
pub struct RawClient {
    pub channel: Channel,
}

impl RawClient {
    pub async fn connect(path: &Path) -> RawClient {
        let stream = tokio::time::timeout(STEP, UnixStream::connect(path))
            .await
            .expect("connect timed out")
            .expect("connect");
        let (read, write) = stream.into_split();
        RawClient {
            channel: channel_from_io(read, write, 1 << 20),
        }
    }

    /// Connects and writes raw bytes at once (not necessarily a frame). The pool may already
    /// have closed the connection: a rogue does not care whether its write got through.
    pub async fn connect_and_write(path: &Path, bytes: &[u8]) -> RawClient {
        let mut stream = UnixStream::connect(path).await.expect("connect");
        let _ = stream.write_all(bytes).await;
        let (read, write) = stream.into_split();
        RawClient {
            channel: channel_from_io(read, write, 1 << 20),
        }
    }

    pub async fn send(&mut self, message: &Message) {
        let body = encode(message, Codec::Json, &[]).expect("encode");
        tokio::time::timeout(STEP, self.channel.sender.send(body))
            .await
            .expect("send timed out")
            .expect("send");
    }

    /// Connects and writes one frame at once, like [`connect_and_write`](Self::connect_and_write).
    pub async fn connect_and_send(path: &Path, message: &Message) -> RawClient {
        let body = encode(message, Codec::Json, &[]).expect("encode");
        let mut bytes = u32::try_from(body.len())
            .expect("a small frame")
            .to_be_bytes()
            .to_vec();
        bytes.extend_from_slice(&body);
        RawClient::connect_and_write(path, &bytes).await
    }

    /// The next frame: it must be the pool's CHALLENGE. Returns its nonce.
    pub async fn expect_challenge(&mut self) -> String {
        let frame: Option<Bytes> = tokio::time::timeout(STEP, self.channel.receiver.recv())
            .await
            .expect("no CHALLENGE in time")
            .expect("reading the CHALLENGE failed");
        match frame.map(decode) {
            Some(Ok((Message::Challenge { nonce }, _))) => nonce,
            other => panic!("expected CHALLENGE first, got {other:?}"),
        }
    }

    /// Waits until the pool closes the connection, and checks that it sent nothing more.
    pub async fn expect_closed(&mut self) {
        let next = tokio::time::timeout(STEP, self.channel.receiver.recv())
            .await
            .expect("the pool did not close the connection");
        match next {
            Ok(None) => {}
            // The pool closed with bytes of ours unread: the kernel reports a reset.
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the connection closed, got {other:?}"),
        }
    }
}

/// A fake `pypool_worker` package that the launcher takes for the real one (same version), for
/// workers that misbehave before the protocol starts. `main` is the body of its `__main__.py`.
pub struct FakeRuntime {
    pub dir: tempfile::TempDir,
}

impl FakeRuntime {
    pub fn new(main: &str) -> FakeRuntime {
        let dir = tempfile::tempdir().expect("tempdir");
        let package = dir.path().join("pypool_worker");
        std::fs::create_dir(&package).expect("mkdir");
        std::fs::write(
            package.join("__init__.py"),
            format!("__version__ = \"{}\"\n", pool_process::RUNTIME_VERSION),
        )
        .expect("write __init__");
        std::fs::write(package.join("__main__.py"), main).expect("write __main__");
        FakeRuntime { dir }
    }

    /// A spec whose interpreter finds this package first.
    pub fn spec(&self, worker_id: &str) -> pool_core::WorkerSpec {
        let mut spec = pool_core::WorkerSpec::new("ipc-fake", worker_id, app());
        spec.env.insert(
            "PYTHONPATH".to_owned(),
            self.dir.path().to_string_lossy().into_owned(),
        );
        spec
    }
}

/// The pid a fake runtime printed as `fake runtime pid <n>: ...` in the error's stderr tail.
pub fn fake_pid(stderr_tail: &[String]) -> u32 {
    stderr_tail
        .iter()
        .find_map(|line| {
            line.strip_prefix("fake runtime pid ")?
                .split(':')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no pid line in {stderr_tail:?}"))
}
