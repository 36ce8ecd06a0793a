"""Load test: the Rust service (pypool) against the same handlers under uvicorn, back to back.

Run through ``load.sh``, which builds the service and the venv first; this script expects:

    python3 load.py SERVICE_BINARY VENV_PYTHON

Both servers run for the whole test, each on its own port and idle while the other is loaded.
Every cell (route x connections) is measured as a pair, pypool then uvicorn or the other way
round (the order alternates by round, so that a drift in the machine's load does not always
favour one of them), and the pair is repeated REPEAT times. The table gives per cell the median
over the rounds and the spread (min-max), and the ratio pypool / uvicorn computed within each
pair.

Besides requests per second it counts CPU time: the server's (every process of it: the Rust
service and its Python workers; uvicorn's parent and its workers) per request, from
/proc/PID/stat, and wrk's. Requests per second depend on how much of the two CPUs a server gets
while other work runs on the machine; CPU per request does not, and says which server does the
same job with less.

Settings, from the environment (defaults in brackets):

    DURATION [30s]        each wrk run
    REPEAT [2]            pairs per cell
    CONNECTIONS ["16 64"] wrk -c values
    ROUTES ["noop score"]
    WRK_THREADS [1]       wrk -t (wrk shares the two CPUs with the servers: one thread leaves
                          them as much as possible, and is not the bottleneck here)
    WARMUP [3s]           a wrk run per server and route before measuring
    WORKERS [2]           Python processes of each server
    TRANSPORT [stdio]     the pool's transport
    PREFETCH [64]         the pool's prefetch
    SERVICE_ARGS []       more flags for the service (e.g. "--threads 1")
    NICE [0]              nice value for the sessions of both servers and of this script
                          (wrk's), e.g. -10 (needs root and autogroup): on a machine shared
                          with other work, gives the measurement most of the CPUs, so that the
                          figures show the servers rather than the competition
    PYPOOL_PORT [18700], UVICORN_PORT [18701]
    RESULTS               a JSON-lines file for the raw figures [target/service-load/DATE.jsonl]
"""

import json
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCORE_BODY = '{"features":[0.5,1.5,2.5,3.5]}'
TICK = os.sysconf("SC_CLK_TCK")


def env(name, default):
    return os.environ.get(name, default)


def cpu_seconds(pids):
    """utime + stime of the processes (those still alive), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / TICK


def sched_seconds(pids):
    """(time on a CPU, time runnable but waiting for one), summed over every thread of the
    processes, in seconds (/proc/PID/task/TID/schedstat)."""
    run = wait = 0
    for pid in pids:
        try:
            threads = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for t in threads:
            try:
                with open("/proc/%d/task/%s/schedstat" % (pid, t)) as f:
                    fields = f.read().split()
            except OSError:
                continue
            run += int(fields[0])
            wait += int(fields[1])
    return run / 1e9, wait / 1e9


def tree(pid):
    """pid and its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        # Children belong to the thread that started them (pypool spawns from a thread of its
        # own): every thread's list counts.
        try:
            threads = os.listdir("/proc/%d/task" % p)
        except OSError:
            continue
        for t in threads:
            try:
                with open("/proc/%d/task/%s/children" % (p, t)) as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return pids


class Server:
    def __init__(self, name, argv, port, env_extra=None, nice=0):
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile()
        environment = dict(os.environ, **(env_extra or {}))
        # Its own session and process group: stopping it reaches every process it started, and
        # the scheduler (with autogroup, as on most Linux machines) gives its processes one
        # share of the CPUs together, like any other session's, whatever their number.
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log,
                                     start_new_session=True, env=environment)
        if nice:
            set_session_nice(self.proc.pid, nice)
        self.pids = []

    def wait_ready(self, timeout=60.0):
        """Until both routes answer 200 (polling: uvicorn says nothing machine-readable)."""
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                sys.exit("%s exited with %s:\n%s" % (self.name, self.proc.returncode,
                                                     self.log.read().decode(errors="replace")))
            try:
                get(self.port, "/noop")
                get(self.port, "/score", SCORE_BODY)
                break
            except OSError:
                if time.monotonic() > end:
                    sys.exit("%s did not answer on port %d within %.0f s"
                             % (self.name, self.port, timeout))
                time.sleep(0.2)
        self.pids = tree(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass


def set_session_nice(pid, nice):
    """The nice value of pid's session as a whole (its autogroup): with autogroup, a process's
    own nice value only ranks it within its session."""
    try:
        with open("/proc/%d/autogroup" % pid, "w") as f:
            f.write(str(nice))
    except OSError as exc:
        sys.exit("cannot set the session's nice value to %d (needs root and autogroup): %s"
                 % (nice, exc))


def get(port, path, body=None):
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path),
                                     data=None if body is None else body.encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        if response.status != 200:
            raise OSError("status %d" % response.status)
        return response.read()


def to_us(text):
    value, unit = float(text[:-2] if text.endswith(("us", "ms")) else text[:-1]), text
    if unit.endswith("us"):
        return value
    if unit.endswith("ms"):
        return value * 1e3
    return value * 1e6  # "s"


def wrk(port, route, connections, duration, threads, lua):
    argv = ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%s" % duration, "--latency"]
    if route == "score":
        argv += ["-s", lua]
    argv.append("http://127.0.0.1:%d/%s" % (port, route))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    latency = dict(re.findall(r"^\s*(50|99)%\s+([\d.]+(?:us|ms|s))\s*$", out, re.M))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and total and "50" in latency and "99" in latency):
        sys.exit("cannot read wrk's output for %s:\n%s" % (" ".join(argv), out))
    rps, total = float(rps.group(1)), int(total.group(1))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return {"rps": rps, "requests": total, "p50_us": to_us(latency["50"]),
            "p99_us": to_us(latency["99"]), "errors": errors, "wrk_cpu_s": wrk_cpu}


def measure(server, route, connections, duration, threads, lua):
    load_before = os.getloadavg()[0]
    before = [cpu_seconds([pid]) for pid in server.pids]
    sched_before = sched_seconds(server.pids)
    started = time.monotonic()
    result = wrk(server.port, route, connections, duration, threads, lua)
    wall = time.monotonic() - started
    used = [cpu_seconds([pid]) - b for pid, b in zip(server.pids, before)]
    sched_after = sched_seconds(server.pids)
    cpu = sum(used)
    result.update(server=server.name, route=route, connections=connections,
                  # CPUs' worth of time the server's threads spent runnable but waiting for a
                  # CPU: how much other work (wrk, other processes) held it back.
                  runq_wait=round((sched_after[1] - sched_before[1]) / wall, 3),
                  cpu_used=round(cpu / wall, 3),
                  # Share of one CPU each process of the server used, in the order of
                  # server.pids (the Rust service or uvicorn's parent first).
                  process_cpu=[round(u / wall, 3) for u in used],
                  server_cpu_us_per_req=cpu / result["requests"] * 1e6,
                  wrk_cpu_us_per_req=result["wrk_cpu_s"] / result["requests"] * 1e6,
                  loadavg=load_before)
    if result["errors"]:
        print("warning: %s %s c%d: %d errors" % (server.name, route, connections,
                                                   result["errors"]), file=sys.stderr)
    return result


def spread(values, fmt):
    values = sorted(values)
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return "%s (%s–%s)" % (fmt(med), fmt(values[0]), fmt(values[-1]))


def main():
    service_bin, venv_python = sys.argv[1], sys.argv[2]
    duration = env("DURATION", "30s")
    repeat = int(env("REPEAT", "2"))
    connections = [int(c) for c in env("CONNECTIONS", "16 64").split()]
    routes = env("ROUTES", "noop score").split()
    threads = int(env("WRK_THREADS", "1"))
    warmup = env("WARMUP", "3s")
    workers = env("WORKERS", "2")
    pypool_port = int(env("PYPOOL_PORT", "18700"))
    uvicorn_port = int(env("UVICORN_PORT", "18701"))
    results_path = env("RESULTS", os.path.join(
        ROOT, "target", "service-load", time.strftime("%Y%m%d-%H%M%S") + ".jsonl"))
    os.makedirs(os.path.dirname(results_path), exist_ok=True)

    lua = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    lua.write('wrk.method = "POST"\nwrk.body = \'%s\'\n'
              'wrk.headers["Content-Type"] = "application/json"\n' % SCORE_BODY)
    lua.close()

    service_argv = [service_bin, "--addr", "127.0.0.1:%d" % pypool_port, "--workers", workers,
                    "--transport", env("TRANSPORT", "stdio"),
                    "--prefetch", env("PREFETCH", "64"), "--python", venv_python]
    service_argv += shlex.split(env("SERVICE_ARGS", ""))
    uvicorn_argv = [venv_python, "-m", "uvicorn", "uvicorn_app:app", "--app-dir", HERE,
                    "--host", "127.0.0.1", "--port", str(uvicorn_port), "--workers", workers,
                    "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                    "--no-server-header", "--log-level", "warning"]
    # Both run the same interpreter, the venv's. uvicorn's handlers.py imports pypool_worker
    # (for its @handler) from this checkout's python/; the pool's workers get the runtime
    # embedded in the service, which is the same source.
    uvicorn_env = {"PYTHONPATH": os.path.join(ROOT, "python")}
    servers = []

    def stop_all(*_):
        for server in servers:
            server.stop()
        os.unlink(lua.name)
        sys.exit(130)

    nice = int(env("NICE", "0"))
    if nice:
        set_session_nice(os.getpid(), nice)  # this script's session, which wrk runs in
    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    try:
        print("$ %s" % " ".join(map(shlex.quote, service_argv)), file=sys.stderr)
        servers.append(Server("pypool", service_argv, pypool_port, nice=nice))
        print("$ %s" % " ".join(map(shlex.quote, uvicorn_argv)), file=sys.stderr)
        servers.append(Server("uvicorn", uvicorn_argv, uvicorn_port, uvicorn_env, nice))
        for server in servers:
            server.wait_ready()
            print("%s ready: pids %s" % (server.name, server.pids), file=sys.stderr)
        for server in servers:
            for route in routes:
                wrk(server.port, route, max(connections), warmup, threads, lua.name)

        rows = []
        with open(results_path, "w") as out:
            for round_ in range(repeat):
                for route in routes:
                    for c in connections:
                        order = servers if round_ % 2 == 0 else servers[::-1]
                        pair = {}
                        for server in order:
                            r = measure(server, route, c, duration, threads, lua.name)
                            r["round"] = round_
                            pair[server.name] = r
                            out.write(json.dumps(r) + "\n")
                            out.flush()
                            busy = "+".join("%.0f" % (100 * u) for u in r["process_cpu"]
                                            if u >= 0.005)
                            print("round %d %-5s c%-3d %-8s %9.0f req/s  p50 %7.0f us  "
                                  "p99 %7.0f us  CPU %5.1f us/req (%s%%, waited %.0f%%)  "
                                  "load %.1f"
                                  % (round_ + 1, route, c, server.name, r["rps"], r["p50_us"],
                                     r["p99_us"], r["server_cpu_us_per_req"], busy,
                                     100 * r["runq_wait"], r["loadavg"]),
                                  file=sys.stderr)
                        rows.append(pair)
    finally:
        for server in servers:
            server.stop()
        if os.path.exists(lua.name):
            os.unlink(lua.name)

    print()
    print("wrk -t%d, %s per run, %d rounds%s; median (min–max) over the rounds; ratios within "
          "each back-to-back pair; raw figures in %s"
          % (threads, duration, repeat, ", nice %d" % nice if nice else "",
             os.path.relpath(results_path, ROOT)))
    print()
    print("| route | conns | server | req/s | p50 | p99 | server CPU per req "
          "| CPUs used / waited | pypool vs uvicorn: req/s | CPU per req |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for route in routes:
        for c in connections:
            cell = [p for p in rows if p["pypool"]["route"] == route
                    and p["pypool"]["connections"] == c]
            for name in ("pypool", "uvicorn"):
                runs = [p[name] for p in cell]
                line = "| /%s | %d | %s | %s | %s | %s | %s | %s |" % (
                    route, c, name,
                    spread([r["rps"] for r in runs], lambda v: "{:,.0f}".format(v)),
                    spread([r["p50_us"] for r in runs], fmt_us),
                    spread([r["p99_us"] for r in runs], fmt_us),
                    spread([r["server_cpu_us_per_req"] for r in runs], lambda v: "%.1f µs" % v),
                    "%.2f / %.2f" % (statistics.median(r["cpu_used"] for r in runs),
                                     statistics.median(r["runq_wait"] for r in runs)))
                if name == "pypool":
                    rps = [p["pypool"]["rps"] / p["uvicorn"]["rps"] for p in cell]
                    # Above 1: pypool needs less CPU per request.
                    cpu = [p["uvicorn"]["server_cpu_us_per_req"]
                           / p["pypool"]["server_cpu_us_per_req"] for p in cell]
                    line += " %s | %s |" % (ratio_cell(rps, "faster", "slower"),
                                            ratio_cell(cpu, "less CPU", "more CPU"))
                else:
                    line += " | |"
                print(line)


def fmt_us(v):
    return "%.0f µs" % v if v < 1000 else "%.2f ms" % (v / 1000)


def ratio_cell(ratios, better, worse):
    """The median ratio as "1.25x faster" (ratio above 1) or "1.25x slower" (below), and the
    spread of the ratios themselves."""
    med = statistics.median(ratios)
    if med < 1:  # "slower": the spread in the same terms
        med, better, ratios = 1 / med, worse, [1 / r for r in ratios]
    ratios = sorted(ratios)
    text = "%.2fx %s" % (med, better)
    if len(ratios) > 1:
        text += " (%.2f–%.2f)" % (ratios[0], ratios[-1])
    return text


if __name__ == "__main__":
    main()
