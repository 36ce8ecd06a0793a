//! The private directory of an `ipc://` ROUTER: mode 0700, named after our pid and 64 random
//! bits, holding the socket `pool.sock` (mode 0600); removed with it.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The socket's file name inside its private directory.
const SOCKET_NAME: &str = "pool.sock";

/// The longest path a Unix socket address holds (108 bytes on Linux, 104 on the BSDs and macOS,
/// including the terminating NUL).
const MAX_SOCKET_PATH: usize = 103;

/// A socket file in its private directory.
#[derive(Debug)]
pub(crate) struct Place {
    pub(crate) socket: PathBuf,
    dir: PathBuf,
}

impl Place {
    /// A listening socket in a fresh private directory under `configured`, else
    /// `$XDG_RUNTIME_DIR`, the temporary directory or `/tmp` (the first that works).
    pub(crate) fn create(configured: Option<&Path>) -> io::Result<(UnixListener, Place)> {
        let mut last_err = None;
        for base in bases(configured) {
            match Place::create_in(&base) {
                Ok(bound) => return Ok(bound),
                Err(err) => {
                    last_err = Some(io::Error::new(
                        err.kind(),
                        format!("cannot create a socket in {}: {err}", base.display()),
                    ))
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no directory for the zmq socket")))
    }

    fn create_in(base: &Path) -> io::Result<(UnixListener, Place)> {
        let dir = base.join(format!(
            "pypool-zmq-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let socket = dir.join(SOCKET_NAME);
        if socket.as_os_str().as_bytes().len() > MAX_SOCKET_PATH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the socket path {} is too long", socket.display()),
            ));
        }
        // `create`, not `create_all`: the name is fresh; an existing directory is not ours.
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let place = Place { socket, dir };
        let bound = fs::set_permissions(&place.dir, fs::Permissions::from_mode(0o700))
            .and_then(|()| UnixListener::bind(&place.socket))
            .and_then(|listener| {
                // Nobody but us can enter the directory anyway; make the socket as narrow.
                fs::set_permissions(&place.socket, fs::Permissions::from_mode(0o600))?;
                Ok(listener)
            });
        match bound {
            Ok(listener) => Ok((listener, place)),
            Err(err) => {
                place.remove();
                Err(err)
            }
        }
    }

    /// Removes the socket file and its directory; errors other than "already gone" are logged.
    pub(crate) fn remove(&self) {
        for (path, result) in [
            (&self.socket, fs::remove_file(&self.socket)),
            (&self.dir, fs::remove_dir(&self.dir)),
        ] {
            if let Err(err) = result {
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(target: "pypool::zmq", path = %path.display(), error = %err, "cannot remove the zmq socket");
                }
            }
        }
    }
}

fn bases(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(dir) = configured {
        // Workers may run in another working directory: give them an absolute path.
        return vec![std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())];
    }
    let mut bases = Vec::new();
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR") {
        let runtime = PathBuf::from(runtime);
        if runtime.is_absolute() && runtime.is_dir() {
            bases.push(runtime);
        }
    }
    for dir in [std::env::temp_dir(), PathBuf::from("/tmp")] {
        if !bases.contains(&dir) {
            bases.push(dir);
        }
    }
    bases
}
