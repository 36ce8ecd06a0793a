//! The one long-lived thread that spawns every worker process.
//!
//! Why a dedicated thread: on Linux a worker asks the kernel (`PR_SET_PDEATHSIG`) to send it
//! SIGHUP when its parent dies (the runtime then kills its whole process group), so that a pool
//! killed with SIGKILL leaves no orphans. But "parent" there
//! means the *thread* that forked the child, not the process: the signal fires as soon as that
//! thread exits. Tokio's blocking-pool threads exit after being idle for a while, and runtime
//! worker threads exit when their runtime shuts down, so a worker spawned from one of them would
//! be killed at some arbitrary later moment while the pool still uses it. Spawning from one
//! thread that lives as long as the process makes the death signal mean what we want: the pool's
//! process is gone.
//!
//! The thread enters the caller's tokio runtime (through its [`Handle`]) around each spawn, so
//! the child's pipes and exit notifications are registered with the caller's runtime exactly as
//! if the caller had spawned it.

use std::io;
use std::sync::mpsc;

use parking_lot::Mutex;

use tokio::process::{Child, Command};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

struct Request {
    command: Command,
    runtime: Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

static SPAWNER: Mutex<Option<mpsc::Sender<Request>>> = Mutex::new(None);

/// Spawns `command` on the spawner thread, registered with the current tokio runtime, as the
/// leader of a new process group and (on Linux) with the parent-death signal armed.
///
/// Must be called from within a tokio runtime.
pub(crate) async fn spawn(mut command: Command) -> io::Result<Child> {
    isolate(&mut command);
    let runtime = Handle::try_current().map_err(|err| io::Error::other(err.to_string()))?;
    let (reply, answer) = oneshot::channel();
    let request = Request {
        command,
        runtime,
        reply,
    };
    send(request)?;
    answer
        .await
        .map_err(|_| io::Error::other("the pypool spawner thread stopped"))?
}

fn send(request: Request) -> io::Result<()> {
    let mut slot = SPAWNER.lock();
    let request = match slot.as_ref() {
        Some(sender) => match sender.send(request) {
            Ok(()) => return Ok(()),
            // The thread is gone (it cannot normally stop); start a new one below.
            Err(mpsc::SendError(request)) => request,
        },
        None => request,
    };
    let (sender, receiver) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("pypool-spawner".to_owned())
        .spawn(move || run(receiver))?;
    sender
        .send(request)
        .map_err(|_| io::Error::other("the pypool spawner thread stopped"))?;
    *slot = Some(sender);
    Ok(())
}

fn run(requests: mpsc::Receiver<Request>) {
    // The sender lives in a static, so this loop runs until the process exits.
    while let Ok(Request {
        mut command,
        runtime,
        reply,
    }) = requests.recv()
    {
        let _entered = runtime.enter();
        let spawned = command.spawn();
        if let Err(Ok(child)) = reply.send(spawned) {
            // The launch was cancelled while we spawned: nobody will own this worker.
            abandon(child);
        }
    }
}

/// Kills the group of a child nobody will own; dropping it (kill-on-drop) queues it for reaping.
fn abandon(child: Child) {
    if let Some(pid) = child.id() {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: plain syscall; the child is not reaped yet (we own it), so its pid and
            // process group id cannot have been reused.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
    drop(child);
}

/// Own process group, and on Linux a death signal tied to this module's thread.
fn isolate(command: &mut Command) {
    command.process_group(0);
    #[cfg(target_os = "linux")]
    {
        let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe syscalls (prctl, getppid); it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                // SIGHUP, not SIGKILL: the runtime answers it by killing its whole process
                // group, so that what the worker started dies with it. Before the runtime has
                // installed its handler, SIGHUP's default action ends the worker just the same.
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGHUP as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The pool may have died between fork and prctl, in which case the death signal
                // was armed too late to fire: we have been re-parented. Do not start.
                if libc::getppid() != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
}
