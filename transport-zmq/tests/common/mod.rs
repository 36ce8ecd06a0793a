//! What the zmq integration tests share: the interpreter with pyzmq, a launcher wrapper that
//! runs workers with it, pool configs, remote worker processes and process checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use pool_core::{LaunchError, Launched, Launcher, Pool, PoolConfig, WorkerSpec};
use transport_zmq::{Key, ZmqLauncher};

/// Upper bound for any single step; a hang fails the test instead of blocking the suite.
pub const STEP: Duration = Duration::from_secs(60);

/// The Python interpreter with pyzmq: `PYPOOL_TEST_PYTHON` (set by `scripts/test.sh`), else the
/// venv that script creates. The zmq transport needs pyzmq in the worker, so a missing pyzmq
/// fails these tests with instructions instead of skipping them.
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let python = std::env::var_os("PYPOOL_TEST_PYTHON")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv-test/bin/python")
                });
            let probe = std::process::Command::new(&python)
                .args(["-c", "import zmq"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            match probe {
                Ok(status) if status.success() => python,
                _ => panic!(
                    "the zmq transport tests need a Python with pyzmq: `{}` cannot import zmq. \
                     Run scripts/test.sh (it creates target/pyenv-test with pyzmq), or set \
                     PYPOOL_TEST_PYTHON to an interpreter that has pyzmq.",
                    python.display()
                ),
            }
        })
        .clone()
}

/// A launcher that runs local workers with [`python`] (the pool's config would use `python3`).
pub struct WithPython(pub ZmqLauncher);

#[async_trait]
impl Launcher for WithPython {
    fn name(&self) -> &str {
        Launcher::name(&self.0)
    }
    async fn launch(&self, spec: &WorkerSpec) -> Result<Launched, LaunchError> {
        let mut spec = spec.clone();
        spec.python = python();
        self.0.launch(&spec).await
    }
    async fn shutdown(&self) {
        self.0.shutdown().await
    }
    fn handshake_timeout(&self) -> Option<Duration> {
        Launcher::handshake_timeout(&self.0)
    }
    fn launch_timeout(&self) -> Option<Duration> {
        Launcher::launch_timeout(&self.0)
    }
}

pub fn app_path(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../pool-testkit/apps")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

pub fn app() -> String {
    app_path("conformance_app.py")
}

pub fn config(size: usize) -> PoolConfig {
    PoolConfig::new(app())
        .size(size)
        .python(python())
        .checkout_timeout(Duration::from_secs(30))
        .call_timeout(Duration::from_secs(30))
        .start_timeout(Duration::from_secs(60))
}

/// Whether the process exists (a zombie counts: it was not reaped).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

pub fn pids(pool: &Pool) -> Vec<u32> {
    pool.status().workers.iter().filter_map(|w| w.pid).collect()
}

/// A secret file for remote workers, in its own temporary directory.
pub struct SecretFile {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub key: Key,
}

impl SecretFile {
    pub fn new() -> SecretFile {
        SecretFile::with_key(Key::generate())
    }

    pub fn with_key(key: Key) -> SecretFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        std::fs::write(&path, key.to_hex()).expect("write the secret");
        SecretFile { dir, path, key }
    }
}

/// A "remote" worker: a separate `python -m pypool_worker --transport zmq --connect tcp://...`
/// process that this test owns (killed and reaped on drop).
pub struct RemoteWorker {
    pub child: tokio::process::Child,
    pub pid: u32,
}

impl RemoteWorker {
    pub fn start(endpoint: &str, secret: &Path, app: &str, extra: &[&str]) -> RemoteWorker {
        let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
        let mut command = tokio::process::Command::new(python());
        command
            .args([
                "-m",
                "pypool_worker",
                "--app",
                app,
                "--transport",
                "zmq",
                "--connect",
            ])
            .arg(endpoint)
            .arg("--secret-file")
            .arg(secret)
            .args(extra)
            .env("PYTHONPATH", &package)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command.spawn().expect("start a remote worker");
        let pid = child.id().expect("a pid");
        RemoteWorker { child, pid }
    }

    /// Waits for the worker to exit and returns its stderr.
    pub async fn finish(mut self) -> (std::process::ExitStatus, String) {
        use tokio::io::AsyncReadExt;
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = tokio::time::timeout(STEP, pipe.read_to_string(&mut stderr)).await;
        }
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("the remote worker did not exit")
            .expect("wait");
        (status, stderr)
    }

    pub fn kill(&self) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGKILL);
        }
    }
}

/// A remote launcher on a free loopback port, bound, with its endpoint.
pub async fn remote_launcher(key: &Key) -> (Arc<ZmqLauncher>, String) {
    let launcher = Arc::new(ZmqLauncher::remote("127.0.0.1:0", key.clone()));
    let endpoint = launcher.bind().await.expect("bind");
    (launcher, endpoint)
}
