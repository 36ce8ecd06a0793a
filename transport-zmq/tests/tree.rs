//! Whatever a local zmq worker starts dies with it, on every way a worker ends.
#![cfg(target_os = "linux")]

mod common;

use std::sync::Arc;

use common::WithPython;
use pool_core::Launcher;
use transport_zmq::ZmqLauncher;

struct ZmqLocal;

impl pool_testkit::conformance::Target for ZmqLocal {
    fn launcher(&self) -> Arc<dyn Launcher> {
        Arc::new(WithPython(ZmqLauncher::new()))
    }
}

pool_testkit::tree_suite!(ZmqLocal);
