"""``--workers N``: one command that runs N remote zmq workers and lives and dies with them.

A remote host scales out by starting the worker command under whatever process manager it
already runs (systemd, a container runtime, supervisord, ...). ``--workers N`` lets one such
process stand for N workers without pypool becoming a process manager itself: it starts N
ordinary workers (the same command without ``--workers``), each in its own process group, and
restarts none of them. When any one ends, the others are stopped (SIGTERM to their groups, then
SIGKILL after a grace period) and this process exits with that worker's status, so the process
manager restarts the whole set. Each worker joins the pool as a new worker; the pool counts it
like any other.

Each worker also exits by itself when this process goes away (the runtime watches its parent).
"""

import os
import signal
import subprocess
import sys
import time

STOP_GRACE_SECONDS = 2.0
_POLL_SECONDS = 0.02


def _child_argv(argv):
    """``argv`` without ``--workers N`` / ``--workers=N``."""
    out = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return out


def _status_code(status):
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 1


class _Set:
    def __init__(self, log):
        self.log = log
        self.alive = {}  # pid -> index

    def stop_all(self, grace=STOP_GRACE_SECONDS):
        """SIGTERM every live worker's group, SIGKILL what is left after ``grace``; reap all."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in list(self.alive):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.alive and time.monotonic() < deadline:
                for pid in list(self.alive):
                    try:
                        done, _ = os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        done = pid
                    if done:
                        self.alive.pop(pid, None)
                if self.alive:
                    time.sleep(_POLL_SECONDS)
            if not self.alive:
                return


def run_workers(argv, count, log, exit_hooks):
    """Start ``count`` workers for ``argv``; return the exit status for this process. ``log``
    writes a line to stderr; ``exit_hooks`` is the runtime's list of what to run on its way
    out."""
    workers = _Set(log)
    # However this process ends (SIGTERM, its parent going away, the first worker's exit), the
    # runtime's exit path stops the remaining workers first.
    exit_hooks.append(workers.stop_all)
    command = [sys.executable, "-m", "pypool_worker"] + _child_argv(argv)
    for index in range(count):
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        workers.alive[child.pid] = index
        # Popen would reap it on garbage collection; we reap with waitpid ourselves.
        child.returncode = 0
    log("started %d workers: %s" % (count, ", ".join(str(pid) for pid in workers.alive)))
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if pid in workers.alive:
            index = workers.alive.pop(pid)
            code = _status_code(status)
            log("worker %d (pid %d) ended with status %d; stopping the other %d"
                % (index, pid, code, len(workers.alive)))
            return code
