//! `pypool doctor`: what this machine gives pypool, and what to do about what is missing.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pypool::process::{materialize_runtime, RUNTIME_VERSION};
use pypool::stdio::StdioLauncher;
use pypool::{Pool, PoolConfig, WorkerSpec};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::assets::{Assets, DEMO_HANDLERS};
use crate::measure::ms;
use crate::ui::{fmt_us, Failure, Ui};
use crate::Global;

#[derive(Debug, Serialize)]
struct PythonCheck {
    ok: bool,
    requested: PathBuf,
    /// Why this interpreter: as configured (--python), from $PYPOOL_PYTHON, the active
    /// virtualenv, or python3 in PATH.
    chosen: Option<String>,
    executable: Option<PathBuf>,
    version: Option<String>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct RuntimeCheck {
    embedded_version: &'static str,
    /// The `pypool_worker` the interpreter can import by itself, if any.
    installed_version: Option<String>,
    /// `installed` when workers use that one, `embedded` when they use the copy in `cache_dir`.
    source: Option<&'static str>,
    cache_dir: Option<PathBuf>,
    error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ModuleCheck {
    available: bool,
    version: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    needed_for: String,
}

#[derive(Debug, Serialize)]
struct Modules {
    msgpack: Option<ModuleCheck>,
    zmq: Option<ModuleCheck>,
}

#[derive(Debug, Serialize)]
struct Unavailable {
    name: &'static str,
    reason: String,
}

#[derive(Debug, Serialize)]
struct Transports {
    compiled_in: Vec<&'static str>,
    unavailable: Vec<Unavailable>,
}

#[derive(Debug, Serialize)]
struct Platform {
    os: &'static str,
    arch: &'static str,
    /// Workers get SIGKILL from the kernel when the pool's process dies (Linux).
    parent_death_signal: bool,
    /// Each worker runs in its own process group, so signals reach what it started (Unix).
    process_groups: bool,
}

#[derive(Debug, Serialize)]
struct WorkerCheck {
    ok: bool,
    startup_ms: Option<f64>,
    round_trip_us: Option<f64>,
    error: Option<String>,
}

/// What `pypool doctor --json` prints.
#[derive(Debug, Serialize)]
struct Report {
    ok: bool,
    python: PythonCheck,
    runtime: RuntimeCheck,
    modules: Modules,
    transports: Transports,
    platform: Platform,
    worker_check: WorkerCheck,
    advice: Vec<String>,
}

const MODULE_PROBE: &str = r#"
import json
out = {}
for name in ("msgpack", "zmq"):
    try:
        module = __import__(name)
        version = getattr(module, "__version__", None)
        if name == "zmq" and hasattr(module, "pyzmq_version"):
            version = module.pyzmq_version()
        if version is None and hasattr(module, "version"):
            version = ".".join(str(part) for part in module.version)
        out[name] = {"available": True, "version": None if version is None else str(version)}
    except Exception as exc:
        out[name] = {"available": False, "version": None,
                     "error": "%s: %s" % (type(exc).__name__, exc)}
print("PYPOOL_DOCTOR " + json.dumps(out))
"#;

pub async fn run(global: &Global) -> Result<ExitCode, Failure> {
    let ui = Ui::new(global);
    let spinner = ui.spinner("checking the interpreter");
    let launcher = Arc::new(StdioLauncher::new());
    let mut spec = WorkerSpec::new("doctor", "probe", "");
    spec.python = global.python.clone();
    let interpreter = launcher.processes().interpreter(&spec).await;
    let python = match &interpreter {
        Ok(i) => PythonCheck {
            ok: true,
            requested: i.requested.clone(),
            chosen: Some(i.source.to_string()),
            executable: Some(i.executable.clone()),
            version: Some(i.version.clone()),
            error: None,
        },
        Err(err) => PythonCheck {
            ok: false,
            requested: global.python.clone(),
            chosen: None,
            executable: None,
            version: None,
            error: Some(err.to_string()),
        },
    };

    let mut runtime = RuntimeCheck {
        embedded_version: RUNTIME_VERSION,
        installed_version: None,
        source: None,
        cache_dir: None,
        error: None,
    };
    let mut modules = Modules {
        msgpack: None,
        zmq: None,
    };
    if let Ok(i) = &interpreter {
        runtime.installed_version = i.installed_runtime.clone();
        if i.has_matching_runtime() {
            runtime.source = Some("installed");
        } else {
            runtime.source = Some("embedded");
            match tokio::task::spawn_blocking(materialize_runtime).await {
                Ok(Ok(dir)) => runtime.cache_dir = Some(dir),
                Ok(Err(err)) => runtime.error = Some(err.to_string()),
                Err(err) => runtime.error = Some(err.to_string()),
            }
        }
        spinner.set_message("checking optional Python modules");
        let (msgpack, zmq) = match probe_modules(&i.executable).await {
            Ok(found) => found,
            Err(err) => {
                let unknown = ModuleCheck {
                    available: false,
                    version: None,
                    error: Some(err),
                    needed_for: String::new(),
                };
                (unknown.clone(), unknown)
            }
        };
        modules.msgpack = Some(ModuleCheck {
            needed_for: "the MessagePack codec (optional; JSON otherwise)".into(),
            ..msgpack
        });
        modules.zmq = Some(ModuleCheck {
            needed_for: "the zmq transport".into(),
            ..zmq
        });
    }

    let transports = Transports {
        compiled_in: pypool::transports().to_vec(),
        unavailable: ["stdio", "ipc", "zmq", "fake"]
            .into_iter()
            .filter_map(|name| {
                pypool::launcher(name).err().map(|err| Unavailable {
                    name,
                    reason: err.reason(),
                })
            })
            .collect(),
    };
    let platform = Platform {
        os: std::env::consts::OS,
        arch: std::env::consts::ARCH,
        parent_death_signal: cfg!(target_os = "linux"),
        process_groups: cfg!(unix),
    };

    spinner.set_message("starting a worker and calling it");
    let worker_check = if python.ok {
        worker_check(global, launcher).await
    } else {
        WorkerCheck {
            ok: false,
            startup_ms: None,
            round_trip_us: None,
            error: Some("skipped: no working interpreter".into()),
        }
    };
    spinner.finish_and_clear();

    let advice = advice(&python, &runtime, &modules, &platform, &worker_check);
    let report = Report {
        ok: python.ok && worker_check.ok,
        python,
        runtime,
        modules,
        transports,
        platform,
        worker_check,
        advice,
    };
    if ui.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| Failure::failed(e.to_string()))?
        );
    } else {
        print_human(&report);
    }
    if report.ok {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(
            Failure::failed("workers cannot run on this machine as configured (see above)")
                .json_printed(),
        )
    }
}

async fn probe_modules(python: &std::path::Path) -> Result<(ModuleCheck, ModuleCheck), String> {
    let child = tokio::process::Command::new(python)
        .arg("-c")
        .arg(MODULE_PROBE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .map_err(|_| "the module probe did not finish within 60 s".to_owned())?
        .map_err(|err| format!("cannot run the module probe: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PYPOOL_DOCTOR "))
        .ok_or_else(|| {
            format!(
                "the module probe printed no answer: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )
        })?;
    #[derive(Deserialize)]
    struct Answer {
        msgpack: ModuleCheck,
        zmq: ModuleCheck,
    }
    let answer: Answer = serde_json::from_str(line)
        .map_err(|err| format!("unreadable module probe answer: {err}"))?;
    Ok((answer.msgpack, answer.zmq))
}

/// Starts one real worker on the demo handlers and calls it.
async fn worker_check(global: &Global, launcher: Arc<StdioLauncher>) -> WorkerCheck {
    let failed = |error: String| WorkerCheck {
        ok: false,
        startup_ms: None,
        round_trip_us: None,
        error: Some(error),
    };
    let assets = match Assets::write(&[DEMO_HANDLERS]) {
        Ok(assets) => assets,
        Err(err) => return failed(format!("cannot write the check's handlers: {err}")),
    };
    let config = PoolConfig::new(assets.path(DEMO_HANDLERS.0).to_string_lossy())
        .name("doctor")
        .size(1)
        .python(&global.python)
        .start_timeout(Duration::from_secs(60));
    let t0 = Instant::now();
    let pool = match Pool::start(config, launcher).await {
        Ok(pool) => pool,
        Err(err) => return failed(err.to_string()),
    };
    let startup = t0.elapsed();
    let t1 = Instant::now();
    let reply = pool.call("add", json!({"a": 2, "b": 3})).await;
    let round_trip = t1.elapsed();
    pool.shutdown(Duration::from_secs(5)).await;
    match reply {
        Ok(reply) if reply.value == json!(5) => WorkerCheck {
            ok: true,
            startup_ms: Some(ms(startup)),
            round_trip_us: Some((round_trip.as_secs_f64() * 1e7).round() / 10.0),
            error: None,
        },
        Ok(reply) => failed(format!("add(2, 3) returned {}", reply.value)),
        Err(err) => failed(err.to_string()),
    }
}

fn advice(
    python: &PythonCheck,
    runtime: &RuntimeCheck,
    modules: &Modules,
    platform: &Platform,
    worker: &WorkerCheck,
) -> Vec<String> {
    let mut advice = Vec::new();
    let exe = python
        .executable
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| python.requested.display().to_string());
    if !python.ok {
        advice.push(format!(
            "Install Python 3 (for example `apt-get install python3`), or point pypool at one with --python PATH (tried `{}`).",
            python.requested.display()
        ));
    }
    if let Some(err) = &runtime.error {
        advice.push(format!(
            "The embedded worker runtime could not be written to a cache directory ({err}): set XDG_CACHE_HOME to a writable directory, or install pypool_worker into the interpreter (`{exe} -m pip install ./python`)."
        ));
    }
    if modules.msgpack.as_ref().is_some_and(|m| !m.available) {
        advice.push(format!(
            "Optional: `{exe} -m pip install msgpack` makes message headers MessagePack instead of the standard library's marshal (about as fast; quicker for many strings); everything works without it."
        ));
    }
    if modules.zmq.as_ref().is_some_and(|m| !m.available) {
        advice.push(format!(
            "Only for the zmq transport: `{exe} -m pip install pyzmq`."
        ));
    }
    if !platform.parent_death_signal {
        advice.push("No parent-death signal on this platform: if the pool's process is killed with SIGKILL, workers notice through their closed pipes and a parent check instead, a moment later.".to_owned());
    }
    if python.ok && !worker.ok {
        advice.push("A worker could not start or answer: read the error above; `pypool -v doctor` shows what the worker wrote to stderr.".to_owned());
    }
    advice
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "PROBLEM"
    }
}

fn print_human(r: &Report) {
    println!("pypool doctor");
    println!();
    let p = &r.python;
    match (&p.executable, &p.version) {
        (Some(exe), Some(version)) => println!(
            "interpreter   {} -> {} (Python {version}; {})  {}",
            p.requested.display(),
            exe.display(),
            p.chosen.as_deref().unwrap_or("as configured"),
            mark(true)
        ),
        _ => println!(
            "interpreter   {}: {}  {}",
            p.requested.display(),
            p.error.as_deref().unwrap_or("unusable"),
            mark(false)
        ),
    }
    let rt = &r.runtime;
    match rt.source {
        Some("installed") => println!(
            "runtime       pypool_worker {} installed in the interpreter; workers use it  ok",
            rt.embedded_version
        ),
        Some(_) => println!(
            "runtime       pypool_worker {} embedded{}; workers use the copy in {}  {}",
            rt.embedded_version,
            rt.installed_version
                .as_deref()
                .map(|v| format!(" (the interpreter has {v}, a different version)"))
                .unwrap_or_default(),
            rt.cache_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "(no cache directory)".into()),
            mark(rt.error.is_none())
        ),
        None => println!(
            "runtime       pypool_worker {} embedded (not checked: no interpreter)",
            rt.embedded_version
        ),
    }
    for (name, module) in [("msgpack", &r.modules.msgpack), ("zmq", &r.modules.zmq)] {
        if let Some(m) = module {
            if m.available {
                println!(
                    "{name:<13} {} installed: {}",
                    m.version.as_deref().unwrap_or("(unknown version)"),
                    m.needed_for
                );
            } else {
                println!("{name:<13} not installed: needed only for {}", m.needed_for);
            }
        }
    }
    println!(
        "transports    compiled in: {}",
        if r.transports.compiled_in.is_empty() {
            "none".to_owned()
        } else {
            r.transports.compiled_in.join(", ")
        }
    );
    for u in &r.transports.unavailable {
        println!("              {}: {}", u.name, u.reason);
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!(
        "platform      {} {}; parent-death signal (PR_SET_PDEATHSIG): {}; process groups: {}",
        r.platform.os,
        r.platform.arch,
        yes(r.platform.parent_death_signal),
        yes(r.platform.process_groups)
    );
    let w = &r.worker_check;
    match (w.startup_ms, w.round_trip_us) {
        (Some(startup), Some(rt)) => println!(
            "worker check  1 worker started in {}, answered add(2, 3) in {}  ok",
            fmt_us(startup * 1e3),
            fmt_us(rt)
        ),
        _ => println!(
            "worker check  {}  {}",
            w.error.as_deref().unwrap_or("failed"),
            mark(false)
        ),
    }
    println!();
    if r.advice.is_empty() {
        println!("Everything pypool needs is here.");
    } else {
        println!(
            "{}",
            if r.ok {
                "Works. Suggestions:"
            } else {
                "To do:"
            }
        );
        for a in &r.advice {
            println!("  - {a}");
        }
    }
}
