//! Materialising the embedded runtime.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};

use pool_process::runtime::{self, materialize_runtime_in, FILES, PACKAGE, RUNTIME_VERSION};

#[test]
fn version_comes_from_the_embedded_package() {
    assert!(!RUNTIME_VERSION.is_empty());
    let init = FILES
        .iter()
        .find(|(name, _)| *name == "__init__.py")
        .map(|(_, contents)| *contents)
        .expect("__init__.py is embedded");
    assert!(init.contains(&format!("__version__ = \"{RUNTIME_VERSION}\"")));
    let mut names: Vec<String> = FILES.iter().map(|(name, _)| (*name).to_owned()).collect();
    names.sort();
    // Every module of the package is embedded, so a bare python3 gets all of it.
    let package = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pypool_worker");
    let mut on_disk: Vec<String> = std::fs::read_dir(&package)
        .expect("the package directory")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".py"))
        .collect();
    on_disk.sort();
    assert_eq!(names, on_disk);
}

#[test]
fn concurrent_materialisation_is_safe() {
    let root = tempfile::tempdir().expect("tempdir");
    let cache = root.path().join("cache").join("pypool");
    let barrier = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            let cache = cache.clone();
            std::thread::spawn(move || {
                barrier.wait();
                materialize_runtime_in(&cache)
            })
        })
        .collect();
    let dirs: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("thread").expect("materialize"))
        .collect();
    assert!(dirs.iter().all(|d| *d == dirs[0]), "{dirs:?}");
    let dir = &dirs[0];
    assert!(dir.starts_with(&cache));
    let name = dir.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(name.contains(&runtime::runtime_digest()[..24]), "{name}");

    for (file, contents) in FILES {
        let found = std::fs::read_to_string(dir.join(PACKAGE).join(file)).expect("read");
        assert_eq!(found, *contents, "{file} differs");
    }
    // Only the finished copy is left: every temporary directory was renamed or removed.
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .expect("read cache")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(entries, vec![dir.file_name().expect("name").to_owned()]);
    for private in [&cache, dir] {
        let mode = std::fs::metadata(private)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{private:?}");
    }
    // Idempotent.
    assert_eq!(&materialize_runtime_in(&cache).expect("again"), dir);
}

#[test]
fn default_location_works() {
    let dir = pool_process::materialize_runtime().expect("materialize");
    assert!(dir.join(PACKAGE).join("__main__.py").is_file());
}
