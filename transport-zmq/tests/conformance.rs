//! The transport conformance suite against real Python workers (pyzmq DEALERs) over the zmq
//! transport in local mode: over `ipc://` (unsigned, a private directory) and over loopback
//! `tcp://` (every message signed), so that signing is exercised by the whole suite too.

mod common;

mod ipc {
    use std::sync::Arc;

    use pool_core::Launcher;
    use pool_testkit::conformance::Target;
    use transport_zmq::ZmqLauncher;

    use super::common::WithPython;

    struct ZmqIpc;

    impl Target for ZmqIpc {
        fn launcher(&self) -> Arc<dyn Launcher> {
            Arc::new(WithPython(ZmqLauncher::new()))
        }
    }

    pool_testkit::conformance_suite!(ZmqIpc);
}

mod tcp {
    use std::sync::Arc;

    use pool_core::Launcher;
    use pool_testkit::conformance::Target;
    use transport_zmq::ZmqLauncher;

    use super::common::WithPython;

    struct ZmqTcp;

    impl Target for ZmqTcp {
        fn launcher(&self) -> Arc<dyn Launcher> {
            Arc::new(WithPython(ZmqLauncher::new().bind_tcp("127.0.0.1:0")))
        }
    }

    pool_testkit::conformance_suite!(ZmqTcp);
}
