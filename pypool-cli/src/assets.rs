//! Python files embedded in the binary and written to a private temporary directory at run time.

use std::io;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// The demo's handlers (also used by `bench` and `doctor`).
pub const DEMO_HANDLERS: (&str, &str) =
    ("demo_handlers.py", include_str!("../demo/demo_handlers.py"));
/// The raw-pipes echo for `bench --baseline`.
pub const RAW_ECHO: (&str, &str) = ("raw_echo.py", include_str!("../bench/raw_echo.py"));
/// Python's own pools for `bench --baseline`.
pub const PYTHON_POOLS: (&str, &str) =
    ("python_pools.py", include_str!("../bench/python_pools.py"));

/// A temporary directory holding some of the embedded files; removed when dropped.
#[derive(Debug)]
pub struct Assets {
    dir: TempDir,
}

impl Assets {
    /// Writes `files` (name, contents) into a fresh private directory.
    pub fn write(files: &[(&str, &str)]) -> io::Result<Assets> {
        let dir = tempfile::Builder::new().prefix("pypool-cli-").tempdir()?;
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents)?;
        }
        Ok(Assets { dir })
    }

    /// The path of one of the files.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory.
    #[allow(dead_code)]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
