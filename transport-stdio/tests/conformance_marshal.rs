//! The transport conformance suite against real Python workers over stdio, with the codec a
//! worker without msgpack negotiates: the standard library's marshal. (The other suite's
//! interpreter may have msgpack, which the pool prefers.)

use std::sync::{Arc, OnceLock};

use pool_core::Launcher;
use pool_testkit::conformance::{app_path, Target};
use transport_stdio::StdioLauncher;

struct StdioMarshal;

impl Target for StdioMarshal {
    fn launcher(&self) -> Arc<dyn Launcher> {
        Arc::new(StdioLauncher::new())
    }

    fn app(&self) -> String {
        static APP: OnceLock<String> = OnceLock::new();
        APP.get_or_init(|| {
            // The conformance app, served as an interpreter without msgpack would serve it.
            let conformance = app_path("conformance_app.py");
            let app = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("conformance_marshal_app.py");
            let source = format!(
                "from pypool_worker import protocol\n\
                 protocol._msgpack = None  # HELLO then offers json and marshal only\n\
                 _path = {conformance:?}\n\
                 with open(_path) as _f:\n    \
                     exec(compile(_f.read(), _path, 'exec'))\n"
            );
            std::fs::write(&app, source).expect("the test's app file can be written");
            app.to_string_lossy().into_owned()
        })
        .clone()
    }
}

pool_testkit::conformance_suite!(StdioMarshal);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_speak_marshal() {
    let pool = pool_core::Pool::start(
        pool_testkit::conformance::config(&StdioMarshal),
        StdioMarshal.launcher(),
    )
    .await
    .expect("the pool starts");
    let status = pool.status();
    assert!(!status.workers.is_empty());
    for worker in &status.workers {
        assert_eq!(worker.codec, "marshal", "{worker:?}");
    }
    pool.shutdown(std::time::Duration::from_secs(5)).await;
}
