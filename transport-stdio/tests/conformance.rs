//! The transport conformance suite against real Python workers over stdio.

use std::sync::Arc;

use pool_core::Launcher;
use pool_testkit::conformance::Target;
use transport_stdio::StdioLauncher;

struct Stdio;

impl Target for Stdio {
    fn launcher(&self) -> Arc<dyn Launcher> {
        Arc::new(StdioLauncher::new())
    }
}

pool_testkit::conformance_suite!(Stdio);
