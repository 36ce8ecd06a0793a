//! Finding the real Python interpreter behind a name such as `python3`.
//!
//! First the name is chosen ([`choose`]): the default `python3` means `$PYPOOL_PYTHON` if set,
//! else the active virtualenv's interpreter (`$VIRTUAL_ENV/bin/python`), else `python3` in
//! `PATH`; any other name or path is used as given. Then `python3` is often a shim (pyenv's is a
//! bash script that runs `pyenv exec`, which costs tens to hundreds of milliseconds and a few
//! processes): the launcher asks the interpreter once for `sys.executable` and execs that binary
//! for every worker.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pool_core::LaunchError;

/// The interpreter name a spec means by default; see [`choose`].
pub const DEFAULT_PYTHON: &str = "python3";

/// The environment variable that names the interpreter for specs that keep the default.
pub const ENV_PYTHON: &str = "PYPOOL_PYTHON";

/// Why an interpreter was chosen, for error messages and `pypool doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PythonSource {
    /// The spec (the pool's `python` setting) named it.
    Configured,
    /// `$PYPOOL_PYTHON`.
    PypoolPython,
    /// The active virtualenv: `$VIRTUAL_ENV/bin/python`.
    VirtualEnv(PathBuf),
    /// The default, `python3` looked up in `PATH`.
    Path,
}

impl std::fmt::Display for PythonSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PythonSource::Configured => f.write_str("as configured"),
            PythonSource::PypoolPython => write!(f, "from ${ENV_PYTHON}"),
            PythonSource::VirtualEnv(venv) => {
                write!(
                    f,
                    "from the active virtualenv $VIRTUAL_ENV={}",
                    venv.display()
                )
            }
            PythonSource::Path => write!(f, "`{DEFAULT_PYTHON}` in PATH"),
        }
    }
}

/// The interpreter to run for a spec whose interpreter is `python`, with extra environment `env`
/// (the worker's, which wins over this process's).
///
/// Anything but the default `python3` is used as given. The default means, in order:
/// `$PYPOOL_PYTHON` when set; the active virtualenv's `bin/python` when `$VIRTUAL_ENV` is set (a
/// tool that sets it without putting the venv first in `PATH`, or a service unit with
/// `Environment=VIRTUAL_ENV=...`); `python3` in `PATH`.
///
/// ```
/// use std::collections::BTreeMap;
/// use std::path::Path;
/// use pool_process::{choose_python, PythonSource};
///
/// let env = BTreeMap::from([("PYPOOL_PYTHON".to_owned(), "/opt/py/bin/python3".to_owned())]);
/// let (python, source) = choose_python(Path::new("python3"), &env);
/// assert_eq!((python.as_path(), source), (Path::new("/opt/py/bin/python3"), PythonSource::PypoolPython));
///
/// // A configured interpreter is never second-guessed.
/// let (python, source) = choose_python(Path::new("/usr/bin/python3.12"), &env);
/// assert_eq!((python.as_path(), source), (Path::new("/usr/bin/python3.12"), PythonSource::Configured));
/// ```
pub fn choose(python: &Path, env: &BTreeMap<String, String>) -> (PathBuf, PythonSource) {
    if python != Path::new(DEFAULT_PYTHON) {
        return (python.to_path_buf(), PythonSource::Configured);
    }
    let var = |name: &str| -> Option<OsString> {
        match env.get(name) {
            Some(value) => Some(OsString::from(value)),
            None => std::env::var_os(name),
        }
        .filter(|value| !value.is_empty())
    };
    if let Some(chosen) = var(ENV_PYTHON) {
        return (PathBuf::from(chosen), PythonSource::PypoolPython);
    }
    if let Some(venv) = var("VIRTUAL_ENV") {
        let venv = PathBuf::from(venv);
        let python = venv.join("bin").join("python");
        if python.exists() {
            return (python, PythonSource::VirtualEnv(venv));
        }
    }
    (python.to_path_buf(), PythonSource::Path)
}

/// What the launcher learned about an interpreter by running it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreter {
    /// The interpreter as the spec named it, after [`choose`] (`python3`, a path, a shim).
    pub requested: PathBuf,
    /// Why this interpreter: configured, `$PYPOOL_PYTHON`, the active virtualenv, or `PATH`.
    pub source: PythonSource,
    /// The command it runs under ([`ProcessLauncher::wrapper`](crate::ProcessLauncher::wrapper)),
    /// empty for none.
    pub wrapper: Vec<String>,
    /// The binary to exec: the interpreter's `sys.executable` (symlinks kept, so a virtualenv's
    /// `bin/python` stays a virtualenv).
    pub executable: PathBuf,
    /// The interpreter's version, e.g. `3.11.7`.
    pub version: String,
    /// The `__version__` of a `pypool_worker` the interpreter can already import, if any.
    pub installed_runtime: Option<String>,
}

impl Interpreter {
    /// Whether the already-importable `pypool_worker` is the same version as the embedded one,
    /// so workers can use it instead of the embedded copy.
    pub fn has_matching_runtime(&self) -> bool {
        !crate::runtime::RUNTIME_VERSION.is_empty()
            && self.installed_runtime.as_deref() == Some(crate::runtime::RUNTIME_VERSION)
    }
}

/// How long the one-off interpreter probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Prefix of the probe's answer line, so that noise a `sitecustomize` prints is skipped.
const MARKER: &str = "PYPOOL_PROBE ";

/// Written to run on any Python (2 included) so that a wrong interpreter gets a precise error.
const PROBE_SCRIPT: &str = r#"
import sys, json
info = {
    "executable": sys.executable or "",
    "version": "%d.%d.%d" % tuple(sys.version_info[:3]),
    "major": sys.version_info[0],
    "runtime": None,
}
try:
    import pypool_worker
    info["runtime"] = str(getattr(pypool_worker, "__version__", ""))
except BaseException:
    pass
sys.stdout.write("PYPOOL_PROBE " + json.dumps(info) + "\n")
sys.stdout.flush()
"#;

/// `wrapper... python`, as a command to add arguments to.
pub(crate) fn command_for(wrapper: &[String], python: &Path) -> tokio::process::Command {
    match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = tokio::process::Command::new(program);
            command.args(args).arg(python);
            command
        }
        None => tokio::process::Command::new(python),
    }
}

/// Chooses the interpreter ([`choose`]), runs `[wrapper...] python -c <probe>` with the worker's
/// environment and working directory (they decide whether `pypool_worker` is importable) and
/// parses the answer.
pub(crate) async fn probe(
    python: &Path,
    wrapper: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&Path>,
) -> Result<Interpreter, LaunchError> {
    let (python, source) = choose(python, env);
    let python = python.as_path();
    let mut shown = format!("`{}`", python.display());
    if !matches!(source, PythonSource::Configured | PythonSource::Path) {
        shown = format!("{shown} ({source})");
    }
    if !wrapper.is_empty() {
        shown = format!("{shown} under `{}`", wrapper.join(" "));
    }
    let mut command = command_for(wrapper, python);
    command
        .arg("-c")
        .arg(PROBE_SCRIPT)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let child = command.spawn().map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => LaunchError::new(format!(
            "Python interpreter {shown} not found{}: {err}",
            if python.components().count() == 1 {
                " in PATH"
            } else {
                ""
            }
        )),
        io::ErrorKind::PermissionDenied => LaunchError::new(format!(
            "Python interpreter {shown} cannot be executed: {err}"
        )),
        _ => LaunchError::new(format!("cannot run Python interpreter {shown}: {err}")),
    })?;
    let output = match tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => {
            return Err(LaunchError::new(format!(
                "cannot run Python interpreter {shown}: {err}"
            )))
        }
        Err(_) => {
            return Err(LaunchError::new(format!(
                "Python interpreter {shown} did not answer a version probe within {}s",
                PROBE_TIMEOUT.as_secs()
            )))
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr: Vec<String> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .rev()
        .take(20)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(str::to_owned)
        .collect();
    let not_python = |why: String| {
        LaunchError::new(format!(
            "{shown} is not a working Python 3 interpreter: {why}"
        ))
        .with_stderr(stderr.clone())
    };
    let Some(answer) = stdout.lines().find_map(|line| line.strip_prefix(MARKER)) else {
        return Err(not_python(format!(
            "the version probe exited with {} and printed no answer",
            status_text(&output.status)
        )));
    };
    let info: serde_json::Value = serde_json::from_str(answer)
        .map_err(|err| not_python(format!("unreadable probe answer ({err})")))?;
    let version = info["version"].as_str().unwrap_or_default().to_owned();
    if info["major"].as_u64() != Some(3) {
        return Err(not_python(format!(
            "it is Python {version}; pypool needs Python 3"
        )));
    }
    let executable = match info["executable"].as_str() {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        // Embedded or unusual builds may not know their binary: keep what we were given.
        _ => python.to_path_buf(),
    };
    let installed_runtime = info["runtime"].as_str().map(str::to_owned);
    Ok(Interpreter {
        requested: python.to_path_buf(),
        source,
        wrapper: wrapper.to_vec(),
        executable,
        version,
        installed_runtime,
    })
}

fn status_text(status: &std::process::ExitStatus) -> String {
    crate::process::exit_info(*status).to_string()
}
