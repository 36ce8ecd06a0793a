//! [`WorkerProcess`]: the [`ProcessHandle`] of a local worker, owning its process group.

use std::collections::VecDeque;
use std::io;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pool_core::{ExitInfo, ProcessHandle};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::{oneshot, watch};

/// Longest stderr line kept as one line; longer ones are split.
const MAX_LINE: usize = 8 * 1024;

/// Control over one worker process and its process group.
///
/// * [`terminate`](ProcessHandle::terminate) and [`kill`](ProcessHandle::kill) signal the whole
///   process group (the worker and anything it started), synchronously, and do nothing once the
///   worker has been reaped, so a recycled pid is never signalled.
/// * [`wait`](ProcessHandle::wait) can be called any number of times, from `&self`, and is
///   cancel-safe: a background task owns the child, reaps it and publishes the exit status. It
///   returns once the status is known and stderr has been read to its end (or a short bound has
///   passed, for a grandchild that keeps stderr open), so [`stderr_tail`](ProcessHandle::stderr_tail)
///   is complete by then.
/// * Dropping the handle while the worker runs kills its process group; the background task
///   still reaps the worker, so no zombie is left.
pub struct WorkerProcess {
    pid: u32,
    control: Arc<Control>,
    exit: watch::Receiver<Option<ExitInfo>>,
    tail: Arc<StderrTail>,
}

impl std::fmt::Debug for WorkerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerProcess")
            .field("pid", &self.pid)
            .field("exit", &*self.exit.borrow())
            .finish()
    }
}

/// Where a worker's stderr goes: `tracing` events, and this bounded tail.
pub(crate) struct StderrTail {
    capacity: usize,
    lines: Mutex<VecDeque<String>>,
}

impl StderrTail {
    pub(crate) fn new(capacity: usize) -> Self {
        StderrTail {
            capacity,
            lines: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
        }
    }

    fn push(&self, line: String) {
        if self.capacity == 0 {
            return;
        }
        let mut lines = self.lines.lock();
        while lines.len() >= self.capacity {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn snapshot(&self) -> Vec<String> {
        self.lines.lock().iter().cloned().collect()
    }
}

/// Shared between the handle (which signals) and the supervisor task (which reaps). The lock
/// makes "signal unless reaped" and "reap" mutually exclusive: while the child is unreaped its
/// pid, and so its process group id, cannot be reused.
struct Control {
    pid: u32,
    reaped: Mutex<bool>,
}

impl Control {
    fn signal(&self, signal: i32) {
        let reaped = self.reaped.lock();
        if *reaped {
            return;
        }
        signal_group(self.pid, signal);
    }

    /// Reaps the child if it has exited, under the lock; marks it reaped.
    ///
    /// Before reaping, whatever is left of the child's process group is killed: descendants
    /// the worker started (a `Popen` child, an `os.fork` child, one that ignores SIGTERM) die
    /// with it on every exit path. This has to happen between the exit and the reap, because
    /// only the unreaped (zombie) leader keeps its pid, and so the group id, from being reused.
    fn try_reap(&self, child: &mut Child) -> io::Result<Option<ExitStatus>> {
        let mut reaped = self.reaped.lock();
        if *reaped {
            return Ok(None);
        }
        if has_exited(self.pid) {
            signal_group(self.pid, SIGKILL);
        }
        let status = child.try_wait();
        match &status {
            Ok(Some(_)) => *reaped = true,
            Ok(None) => {}
            // ECHILD: someone else reaped it (an application that set SIGCHLD to SIG_IGN in
            // the pool's process, say). Either way it is gone; never signal that pid again.
            Err(_) => *reaped = true,
        }
        status
    }

    fn is_reaped(&self) -> bool {
        *self.reaped.lock()
    }
}

/// Whether the child `pid` has exited, without reaping it (`waitid` with `WNOWAIT`). An error
/// (ECHILD: someone else reaped it) counts as exited; the reap that follows then says so.
fn has_exited(pid: u32) -> bool {
    let id: libc::id_t = pid;
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into `info`, which outlives the call. WNOWAIT leaves the child
    // waitable, so the reap below still sees its status.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            id,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is set by a successful waitid (0 when no child has changed state).
    rc != 0 || unsafe { info.si_pid() } != 0
}

fn signal_group(pid: u32, signal: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: plain syscalls with no memory arguments. The caller holds the lock that keeps the
    // child unreaped, so `pid` still names our child and its group.
    unsafe {
        if libc::kill(-pid, signal) != 0 {
            // The group should exist (the child called setpgid before exec); if it somehow does
            // not, still reach the child itself.
            libc::kill(pid, signal);
        }
    }
}

const SIGTERM: i32 = libc::SIGTERM;
const SIGKILL: i32 = libc::SIGKILL;

/// Converts an exit status into the pool's [`ExitInfo`].
pub(crate) fn exit_info(status: ExitStatus) -> ExitInfo {
    ExitInfo {
        code: status.code(),
        signal: std::os::unix::process::ExitStatusExt::signal(&status),
    }
}

/// Labels for the `tracing` events of one worker's stderr.
pub(crate) struct Labels {
    pub(crate) pool: String,
    pub(crate) worker_id: String,
}

impl WorkerProcess {
    /// Takes over a freshly spawned child (stdin/stdout already taken, stderr taken and passed
    /// in): starts the stderr reader and the supervisor on the current runtime.
    pub(crate) fn start<E>(
        child: Child,
        stderr: Option<E>,
        tail_lines: usize,
        labels: Labels,
        stderr_drain: Duration,
    ) -> io::Result<WorkerProcess>
    where
        E: AsyncRead + Unpin + Send + 'static,
    {
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the worker exited before it could be tracked"))?;
        let control = Arc::new(Control {
            pid,
            reaped: Mutex::new(false),
        });
        let tail = Arc::new(StderrTail::new(tail_lines));
        let (stderr_done_tx, stderr_done) = oneshot::channel::<()>();
        match stderr {
            Some(stderr) => {
                tokio::spawn(read_stderr(
                    stderr,
                    Arc::clone(&tail),
                    labels,
                    pid,
                    stderr_done_tx,
                ));
            }
            None => drop(stderr_done_tx),
        }
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(supervise(
            child,
            Arc::clone(&control),
            exit_tx,
            stderr_done,
            stderr_drain,
        ));
        Ok(WorkerProcess {
            pid,
            control,
            exit,
            tail,
        })
    }
}

impl WorkerProcess {
    /// A future that resolves to the exit status once the worker has exited, been reaped and its
    /// stderr drained — like [`wait`](ProcessHandle::wait), but independent of this handle's
    /// lifetime: it still resolves after the handle is dropped (which kills the worker).
    pub fn exited(&self) -> impl std::future::Future<Output = ExitInfo> + Send + 'static {
        let mut exit = self.exit.clone();
        async move {
            let result = exit.wait_for(Option::is_some).await.map(|info| *info);
            match result {
                Ok(Some(info)) => info,
                // The supervisor is gone without a status: its runtime shut down. It killed the
                // group on the way out; the exit status itself is unknown.
                Ok(None) | Err(_) => ExitInfo::default(),
            }
        }
    }
}

#[async_trait]
impl ProcessHandle for WorkerProcess {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn terminate(&self) {
        self.control.signal(SIGTERM);
    }

    fn kill(&self) {
        self.control.signal(SIGKILL);
    }

    async fn wait(&self) -> ExitInfo {
        self.exited().await
    }

    fn try_exit(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    fn rss_bytes(&self) -> Option<u64> {
        rss_bytes(&self.control)
    }

    fn stderr_tail(&self) -> Vec<String> {
        self.tail.snapshot()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // No-op once reaped. The supervisor task keeps running and reaps the killed worker.
        self.control.signal(SIGKILL);
    }
}

#[cfg(target_os = "linux")]
fn rss_bytes(control: &Control) -> Option<u64> {
    // Hold the lock while reading so the pid cannot be reaped and reused under us.
    let reaped = control.reaped.lock();
    if *reaped {
        return None;
    }
    let statm = std::fs::read_to_string(format!("/proc/{}/statm", control.pid)).ok()?;
    drop(reaped);
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory arguments.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page_size = u64::try_from(page_size).ok().filter(|&size| size > 0)?;
    resident_pages.checked_mul(page_size)
}

#[cfg(not(target_os = "linux"))]
fn rss_bytes(_control: &Control) -> Option<u64> {
    None
}

/// Owns the child while it runs. If the supervisor is dropped before reaping (its runtime shut
/// down), the group is killed and the child dropped with kill-on-drop, which hands it to tokio's
/// orphan queue to be reaped in the background.
struct ChildGuard {
    child: Child,
    control: Arc<Control>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.control.signal(SIGKILL);
    }
}

async fn supervise(
    child: Child,
    control: Arc<Control>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    stderr_done: oneshot::Receiver<()>,
    stderr_drain: Duration,
) {
    let mut guard = ChildGuard { child, control };
    let info = wait_reaped(&mut guard).await;
    // Give the stderr reader the chance to reach end-of-file, so the tail holds the last words.
    // A grandchild that inherited stderr may keep it open; do not wait for that forever.
    let _ = tokio::time::timeout(stderr_drain, stderr_done).await;
    exit_tx.send_replace(Some(info));
}

/// Waits for the child to exit and reaps it, with the reap under the [`Control`] lock.
///
/// Tokio's `Child::wait` reaps internally, where we cannot take that lock, so this waits for
/// SIGCHLD instead and reaps with `try_wait`.
async fn wait_reaped(guard: &mut ChildGuard) -> ExitInfo {
    let mut sigchld = {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered before the first check: a SIGCHLD after this point wakes the loop, and
        // an exit before it is seen by that check.
        signal(SignalKind::child()).ok()
    };
    loop {
        match guard.control.try_reap(&mut guard.child) {
            Ok(Some(status)) => return exit_info(status),
            Ok(None) if guard.control.is_reaped() => return ExitInfo::default(),
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(
                    target: "pypool::process",
                    pid = guard.control.pid,
                    error = %err,
                    "cannot wait for worker process"
                );
                return ExitInfo::default();
            }
        }
        match sigchld.as_mut() {
            Some(signals) => {
                if signals.recv().await.is_none() {
                    // The signal driver is shutting down: fall back to polling.
                    sigchld = None;
                }
            }
            // No signal driver on this runtime: poll instead.
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Reads stderr line by line into `tracing` events and the tail. Dropping `done` (at the end)
/// tells the supervisor that stderr reached end-of-file.
async fn read_stderr<E>(
    stderr: E,
    tail: Arc<StderrTail>,
    labels: Labels,
    pid: u32,
    done: oneshot::Sender<()>,
) where
    E: AsyncRead + Unpin,
{
    let mut reader = BufReader::new(stderr);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok(chunk) => chunk,
            Err(err) => {
                tracing::debug!(target: "pypool::process", pid, error = %err, "stderr read failed");
                break;
            }
        };
        if chunk.is_empty() {
            break;
        }
        let room = MAX_LINE - line.len();
        let window = &chunk[..chunk.len().min(room)];
        let (used, complete) = match window.iter().position(|&b| b == b'\n') {
            Some(newline) => {
                line.extend_from_slice(&window[..newline]);
                (newline + 1, true)
            }
            None => {
                line.extend_from_slice(window);
                (window.len(), line.len() >= MAX_LINE)
            }
        };
        reader.consume(used);
        if complete {
            emit(&mut line, &tail, &labels, pid);
        }
    }
    if !line.is_empty() {
        emit(&mut line, &tail, &labels, pid);
    }
    drop(done);
}

fn emit(line: &mut Vec<u8>, tail: &StderrTail, labels: &Labels, pid: u32) {
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    let text = String::from_utf8_lossy(line).into_owned();
    line.clear();
    tracing::info!(
        target: "pypool::worker",
        pool = %labels.pool,
        worker_id = %labels.worker_id,
        pid,
        "{text}"
    );
    tail.push(text);
}
