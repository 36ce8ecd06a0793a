//! The transport conformance suite against real Python workers over the ipc transport.

use std::path::PathBuf;
use std::sync::Arc;

use pool_core::Launcher;
use pool_testkit::conformance::Target;
use transport_ipc::IpcLauncher;

struct Ipc;

fn app(name: &str) -> String {
    let apps = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pool-testkit/apps");
    apps.join(name).to_string_lossy().into_owned()
}

impl Target for Ipc {
    fn launcher(&self) -> Arc<dyn Launcher> {
        Arc::new(IpcLauncher::new())
    }
    fn app(&self) -> String {
        app("conformance_app.py")
    }
    fn broken_app(&self) -> String {
        app("broken_import_app.py")
    }
    fn process_exists(&self, pid: u32) -> bool {
        // A zombie still has a /proc entry: it counts, because it was not reaped.
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }
}

pool_testkit::conformance_suite!(Ipc);
