//! The embedded Python worker runtime (`pypool_worker`).
//!
//! The runtime's source is compiled into this crate, so a pool works with a bare `python3` and
//! nothing installed. When the interpreter already has a `pypool_worker` of exactly
//! [`RUNTIME_VERSION`] the launcher uses that; otherwise it calls [`materialize_runtime`], which
//! writes the embedded files once into a private, content-addressed cache directory and returns
//! the directory to put first on `PYTHONPATH`.
//!
//! Materialising is safe when many pools, threads or processes do it at once: the files are
//! written into a fresh private temporary directory that is then renamed into place in one step,
//! so a reader sees either nothing or the complete package. Losing the rename race is fine (the
//! winner's identical copy is used), and a damaged copy is detected and replaced.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// The name of the embedded Python package.
pub const PACKAGE: &str = "pypool_worker";

/// The source files of the embedded runtime: `(file name inside the package, contents)`.
pub const FILES: &[(&str, &str)] = &[
    ("__init__.py", include_str!("../pypool_worker/__init__.py")),
    ("__main__.py", include_str!("../pypool_worker/__main__.py")),
    ("protocol.py", include_str!("../pypool_worker/protocol.py")),
    ("runtime.py", include_str!("../pypool_worker/runtime.py")),
    (
        "zmq_transport.py",
        include_str!("../pypool_worker/zmq_transport.py"),
    ),
    (
        "zmq_workers.py",
        include_str!("../pypool_worker/zmq_workers.py"),
    ),
];

/// The version of the embedded runtime: the `__version__` its `__init__.py` declares (read at
/// compile time), or `""` if it declares none.
pub const RUNTIME_VERSION: &str = parse_version(FILES[0].1);

/// Finds `__version__ = "x"` (or `'x'`, optionally annotated) at the start of a line.
const fn parse_version(src: &str) -> &str {
    let b = src.as_bytes();
    let key = b"__version__";
    let mut i = 0;
    while i + key.len() <= b.len() {
        if (i == 0 || b[i - 1] == b'\n') && starts_with_at(b, i, key) {
            let mut j = i + key.len();
            // An optional annotation: `__version__: str = "..."`.
            if j < b.len() && b[j] == b':' {
                while j < b.len() && b[j] != b'=' && b[j] != b'\n' {
                    j += 1;
                }
            }
            j = skip_blanks(b, j);
            if j < b.len() && b[j] == b'=' {
                j = skip_blanks(b, j + 1);
                if j < b.len() && (b[j] == b'"' || b[j] == b'\'') {
                    let quote = b[j];
                    let start = j + 1;
                    let mut end = start;
                    while end < b.len() && b[end] != quote && b[end] != b'\n' {
                        end += 1;
                    }
                    if end < b.len() && b[end] == quote {
                        let (_, rest) = b.split_at(start);
                        let (value, _) = rest.split_at(end - start);
                        return match core::str::from_utf8(value) {
                            Ok(version) => version,
                            Err(_) => "",
                        };
                    }
                }
            }
        }
        i += 1;
    }
    ""
}

const fn starts_with_at(b: &[u8], at: usize, key: &[u8]) -> bool {
    let mut k = 0;
    while k < key.len() {
        if at + k >= b.len() || b[at + k] != key[k] {
            return false;
        }
        k += 1;
    }
    true
}

const fn skip_blanks(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
        j += 1;
    }
    j
}

/// The SHA-256 of the embedded files (names and contents), as lowercase hex.
///
/// It names the cache directory, so different builds of the runtime never share one.
pub fn runtime_digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| {
        let mut hasher = Sha256::new();
        for (name, contents) in FILES {
            // Length-prefix every field so that no two file sets hash the same byte stream.
            hasher.update((name.len() as u64).to_be_bytes());
            hasher.update(name.as_bytes());
            hasher.update((contents.len() as u64).to_be_bytes());
            hasher.update(contents.as_bytes());
        }
        hasher
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    })
}

/// The name of the directory (inside a cache root) that holds this runtime.
fn dir_name() -> String {
    let version: String = RUNTIME_VERSION
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let version = if version.is_empty() {
        "unversioned".to_owned()
    } else {
        version
    };
    format!("runtime-{version}-{}", &runtime_digest()[..24])
}

/// The cache roots tried in order: the user's cache directory (`dirs::cache_dir`:
/// `$XDG_CACHE_HOME` or `~/.cache` on Linux, `~/Library/Caches` on macOS) plus `pypool`, then
/// a per-user directory in the system's temporary directory.
pub fn cache_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(cache) = dirs::cache_dir().filter(|dir| dir.is_absolute()) {
        roots.push(cache.join("pypool"));
    }
    roots.push(std::env::temp_dir().join(temp_root_name()));
    roots
}

#[cfg(unix)]
fn temp_root_name() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    format!("pypool-{uid}")
}

#[cfg(not(unix))]
fn temp_root_name() -> String {
    "pypool".to_owned()
}

/// Writes the embedded runtime into the first usable cache root (see [`cache_roots`]) and
/// returns the directory to prepend to `PYTHONPATH` (it contains the `pypool_worker` package).
///
/// Cheap when the runtime is already there: it only checks the existing copy.
pub fn materialize_runtime() -> io::Result<PathBuf> {
    let mut last_err = None;
    for root in cache_roots() {
        match materialize_runtime_in(&root) {
            Ok(dir) => return Ok(dir),
            Err(err) => {
                tracing::debug!(
                    target: "pypool::stdio",
                    root = %root.display(),
                    error = %err,
                    "cannot use runtime cache root"
                );
                last_err = Some(io::Error::new(
                    err.kind(),
                    format!(
                        "cannot materialise the pypool_worker runtime in {}: {err}",
                        root.display()
                    ),
                ));
            }
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no cache directory for the pypool runtime")))
}

/// Like [`materialize_runtime`], but in the given cache root (created with mode 0700 if missing).
///
/// Returns `root/runtime-<version>-<digest>`, which contains the `pypool_worker` package.
pub fn materialize_runtime_in(root: &Path) -> io::Result<PathBuf> {
    ensure_private_dir(root)?;
    let target = root.join(dir_name());
    // A damaged copy (a crash mid-way on a file system without ordered renames, or a hand edit)
    // is moved aside and rewritten; more than a few rounds means someone keeps interfering.
    for _ in 0..3 {
        match verify(&target) {
            Ok(true) => return Ok(target),
            Ok(false) => {
                let stale = root.join(unique_name(".stale"));
                match fs::rename(&target, &stale) {
                    Ok(()) => {
                        let _ = fs::remove_dir_all(&stale);
                    }
                    // Someone else moved it first.
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(err),
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        install(root, &target)?;
    }
    match verify(&target) {
        Ok(true) => Ok(target),
        Ok(false) => Err(io::Error::other(format!(
            "the runtime copy in {} keeps changing under us",
            target.display()
        ))),
        Err(err) => Err(err),
    }
}

/// `Ok(true)` when `dir` holds exactly the embedded files, `Ok(false)` when it holds something
/// else, `Err(NotFound)` when there is nothing.
fn verify(dir: &Path) -> io::Result<bool> {
    fs::metadata(dir)?;
    let package = dir.join(PACKAGE);
    for (name, contents) in FILES {
        match fs::read(package.join(name)) {
            Ok(found) if found == contents.as_bytes() => {}
            Ok(_) => return Ok(false),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(err) => return Err(err),
        }
    }
    Ok(true)
}

/// Writes the files into a fresh temporary directory beside `target`, then renames it into place.
fn install(root: &Path, target: &Path) -> io::Result<()> {
    let tmp = root.join(unique_name(".tmp"));
    create_private_dir(&tmp)?;
    let written = (|| {
        let package = tmp.join(PACKAGE);
        create_private_dir(&package)?;
        for (name, contents) in FILES {
            let mut file = new_private_file(&package.join(name))?;
            file.write_all(contents.as_bytes())?;
        }
        Ok::<(), io::Error>(())
    })();
    if let Err(err) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(err);
    }
    match fs::rename(&tmp, target) {
        Ok(()) => Ok(()),
        Err(err) => {
            let _ = fs::remove_dir_all(&tmp);
            if fs::metadata(target).is_ok() {
                // Lost the race: another writer's complete copy is already in place.
                Ok(())
            } else {
                Err(err)
            }
        }
    }
}

fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos}", std::process::id())
}

#[cfg(unix)]
fn create_private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().mode(0o700).create(path)
}

#[cfg(not(unix))]
fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().create(path)
}

#[cfg(unix)]
fn new_private_file(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn new_private_file(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// Creates `root` (and its parents) if needed and makes sure only we can write into it: it must
/// be a directory owned by us; wider permissions are narrowed to 0700. This matters most for the
/// fallback in the shared temporary directory, where someone else could have created the path.
fn ensure_private_dir(root: &Path) -> io::Result<()> {
    if let Some(parent) = root.parent() {
        fs::create_dir_all(parent)?;
    }
    match create_private_dir(root) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err),
    }
    check_private_dir(root)
}

#[cfg(unix)]
fn check_private_dir(root: &Path) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = fs::metadata(root)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", root.display()),
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by us (uid {uid})",
                root.display(),
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private_dir(root: &Path) -> io::Result<()> {
    if fs::metadata(root)?.is_dir() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", root.display()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("__version__ = \"1.2.3\"\n"), "1.2.3");
        assert_eq!(parse_version("x = 1\n__version__='0.1'\n"), "0.1");
        assert_eq!(parse_version("__version__: str = \"2.0\""), "2.0");
        assert_eq!(parse_version("# __version__ = \"9\"\n"), "");
        assert_eq!(parse_version("__version__ = \"unterminated\n"), "");
        assert_eq!(parse_version(""), "");
    }

    #[test]
    fn digest_is_stable_hex() {
        let digest = runtime_digest();
        assert_eq!(digest.len(), 64);
        assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(digest, runtime_digest());
    }

    #[test]
    fn damaged_copy_is_replaced() -> io::Result<()> {
        let root = std::env::temp_dir().join(unique_name("pypool-runtime-unit"));
        let dir = materialize_runtime_in(&root)?;
        fs::write(dir.join(PACKAGE).join("__init__.py"), b"broken")?;
        let again = materialize_runtime_in(&root)?;
        assert_eq!(again, dir);
        assert!(verify(&again)?);
        fs::remove_dir_all(&root)
    }
}
