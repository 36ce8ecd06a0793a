//! Whatever a stdio worker starts dies with it, on every way a worker ends.
#![cfg(target_os = "linux")]

use std::sync::Arc;

use pool_core::Launcher;
use transport_stdio::StdioLauncher;

struct Stdio;

impl pool_testkit::conformance::Target for Stdio {
    fn launcher(&self) -> Arc<dyn Launcher> {
        Arc::new(StdioLauncher::new())
    }
}

pool_testkit::tree_suite!(Stdio);
