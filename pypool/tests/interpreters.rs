//! Which interpreter workers run: `$PYPOOL_PYTHON`, an active virtualenv, a wrapper command; and
//! the builder that puts a pool together. Real Python processes; every test shuts its pool down
//! and proves its workers gone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use pypool::{ErrorKind, Launcher, Pool};

const HANDLERS: &str = r#"
import sys
from pypool_worker import handler

@handler
def where():
    return {"prefix": sys.prefix, "executable": sys.executable}
"#;

/// A temporary directory with `handlers.py`.
fn app() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("handlers.py"), HANDLERS).expect("write handlers.py");
    dir
}

/// A fresh virtualenv (no pip: nothing is installed in it, not even pypool_worker).
fn venv(dir: &Path) -> PathBuf {
    let venv = dir.join("venv");
    let status = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "python3 -m venv failed: {status}");
    venv
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Shuts the pool down and proves every worker process it had is gone.
async fn finish(pool: Pool) {
    let pids: Vec<u32> = pool.status().workers.iter().filter_map(|w| w.pid).collect();
    assert!(!pids.is_empty());
    pool.shutdown(Duration::from_secs(5)).await;
    for pid in pids {
        assert!(!alive(pid), "worker {pid} outlived the pool");
    }
}

async fn prefix(pool: &Pool) -> PathBuf {
    let reply = pool.call("where", ()).await.expect("where() answers");
    PathBuf::from(reply.value["prefix"].as_str().expect("a prefix"))
}

#[tokio::test]
async fn an_active_virtualenv_is_the_default_interpreter() {
    let dir = app();
    let venv = venv(dir.path());
    let pool = pypool::builder(dir.path().join("handlers.py").to_string_lossy())
        .size(1)
        .env("VIRTUAL_ENV", venv.to_string_lossy())
        .start()
        .await
        .expect("the pool starts in the virtualenv");
    assert_eq!(prefix(&pool).await, venv);
    finish(pool).await;
}

#[tokio::test]
async fn pypool_python_wins_over_the_virtualenv_and_is_named_when_it_fails() {
    let dir = app();
    let venv = venv(dir.path());
    let pool = pypool::builder(dir.path().join("handlers.py").to_string_lossy())
        .size(1)
        .env("VIRTUAL_ENV", "/nonexistent/venv")
        .env("PYPOOL_PYTHON", venv.join("bin/python").to_string_lossy())
        .start()
        .await
        .expect("the pool starts with $PYPOOL_PYTHON");
    assert_eq!(prefix(&pool).await, venv);
    finish(pool).await;

    let err = pypool::builder(dir.path().join("handlers.py").to_string_lossy())
        .size(1)
        .env("PYPOOL_PYTHON", "/nonexistent/bin/python3")
        .start()
        .await
        .expect_err("no such interpreter");
    let message = err.to_string();
    assert!(
        message.contains("`/nonexistent/bin/python3` (from $PYPOOL_PYTHON) not found"),
        "{message}"
    );

    // A configured interpreter is used as given, whatever the environment says.
    let pool = pypool::builder(dir.path().join("handlers.py").to_string_lossy())
        .size(1)
        .python(venv.join("bin/python"))
        .env("PYPOOL_PYTHON", "/nonexistent/bin/python3")
        .start()
        .await
        .expect("the configured interpreter starts");
    assert_eq!(prefix(&pool).await, venv);
    finish(pool).await;
}

#[tokio::test]
async fn workers_run_under_a_wrapper_command() {
    let dir = app();
    let log = dir.path().join("wrapper.log");
    // Records its arguments, then becomes the interpreter (same process, same group).
    let wrapper = [
        "sh".to_owned(),
        "-c".to_owned(),
        r#"echo "$*" >> "$0"; exec "$@""#.to_owned(),
        log.to_string_lossy().into_owned(),
    ];
    let pool = pypool::builder(dir.path().join("handlers.py").to_string_lossy())
        .size(2)
        .python_wrapper(wrapper)
        .start()
        .await
        .expect("the pool starts under the wrapper");
    prefix(&pool).await;
    let lines = std::fs::read_to_string(&log).expect("the wrapper ran");
    let workers = lines
        .lines()
        .filter(|line| line.contains(" -m pypool_worker --app "))
        .count();
    let probes = lines.lines().filter(|line| line.contains(" -c ")).count();
    assert_eq!((workers, probes), (2, 1), "{lines}");
    finish(pool).await;
}

fn pick(name: &str) -> pypool::Result<Arc<dyn Launcher>> {
    // The point: `?` converts a missing transport into pypool::Error.
    let launcher = pypool::launcher(name)?;
    Ok(launcher)
}

#[tokio::test]
async fn a_missing_transport_is_a_configuration_error() {
    assert!(pick("stdio").is_ok());
    let err = pick("carrier-pigeon").err().expect("no such transport");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.to_string()
            .contains("unknown transport 'carrier-pigeon'"),
        "{err}"
    );

    let err = pypool::builder("handlers.py")
        .transport("carrier-pigeon")
        .start()
        .await
        .expect_err("no such transport");
    assert_eq!(err.kind(), ErrorKind::Config);
}
