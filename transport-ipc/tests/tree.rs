//! Whatever an ipc worker starts dies with it, on every way a worker ends.
#![cfg(target_os = "linux")]

use std::sync::Arc;

use pool_core::Launcher;
use transport_ipc::IpcLauncher;

struct Ipc;

impl pool_testkit::conformance::Target for Ipc {
    fn launcher(&self) -> Arc<dyn Launcher> {
        Arc::new(IpcLauncher::new())
    }
}

pool_testkit::tree_suite!(Ipc);
