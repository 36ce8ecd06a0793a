//! The transport conformance suite against real Python workers over the ipc transport.

use std::sync::Arc;

use pool_core::Launcher;
use pool_testkit::conformance::Target;
use transport_ipc::IpcLauncher;

struct Ipc;

impl Target for Ipc {
    fn launcher(&self) -> Arc<dyn Launcher> {
        Arc::new(IpcLauncher::new())
    }
}

pool_testkit::conformance_suite!(Ipc);
