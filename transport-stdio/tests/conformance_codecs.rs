//! The transport conformance suite against real Python workers over stdio, once per header
//! codec (PROTOCOL.md, section 2): the plain suite speaks whichever the default interpreter
//! gets, so each codec is pinned here. JSON and marshal by restricting what the worker offers
//! (an app that, like an interpreter without msgpack, leaves a codec out of HELLO), msgpack with
//! the test interpreter, which has it (`PYPOOL_TEST_PYTHON`, set by `scripts/test.sh`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pool_core::{Launcher, Pool};
use pool_testkit::conformance::{app_path, config, Target};
use transport_stdio::StdioLauncher;

/// The conformance app behind `prelude`, written once into the tests' scratch directory.
fn app_after(name: &str, prelude: &str) -> String {
    let conformance = app_path("conformance_app.py");
    let app = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.py"));
    let source = format!(
        "{prelude}\n_path = {conformance:?}\nwith open(_path) as _f:\n    \
         exec(compile(_f.read(), _path, 'exec'))\n"
    );
    // The tests of a module run at once and each writes these same bytes: written aside and
    // renamed into place, so that a worker starting meanwhile reads a whole file, old or new.
    static WRITES: AtomicUsize = AtomicUsize::new(0);
    let aside = app.with_extension(format!(
        "py.{}.{}",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&aside, source).expect("the test's app file can be written");
    std::fs::rename(&aside, &app).expect("the test's app file can be renamed into place");
    app.to_string_lossy().into_owned()
}

/// Starts a pool on `target` and checks that every worker settled on `codec`.
async fn assert_codec(target: &dyn Target, codec: &str) {
    let pool = Pool::start(config(target), target.launcher())
        .await
        .expect("the pool starts");
    let status = pool.status();
    assert!(!status.workers.is_empty());
    for worker in &status.workers {
        assert_eq!(worker.codec, codec, "{worker:?}");
    }
    pool.shutdown(std::time::Duration::from_secs(5)).await;
}

mod json {
    use super::*;

    /// Workers that offer JSON only, as a worker in another language might.
    pub struct StdioJson;

    impl Target for StdioJson {
        fn launcher(&self) -> Arc<dyn Launcher> {
            Arc::new(StdioLauncher::new())
        }
        fn app(&self) -> String {
            app_after(
                "conformance_json_app",
                "from pypool_worker import protocol\n\
                 protocol.available_codecs = lambda: [protocol.JSON]",
            )
        }
    }

    pool_testkit::conformance_suite!(StdioJson);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_workers_speak_json() {
        assert_codec(&StdioJson, "json").await;
    }
}

mod marshal {
    use super::*;

    /// Workers whose interpreter has no msgpack.
    pub struct StdioMarshal;

    impl Target for StdioMarshal {
        fn launcher(&self) -> Arc<dyn Launcher> {
            Arc::new(StdioLauncher::new())
        }
        fn app(&self) -> String {
            app_after(
                "conformance_marshal_app",
                "from pypool_worker import protocol\nprotocol._msgpack = None",
            )
        }
    }

    pool_testkit::conformance_suite!(StdioMarshal);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_workers_speak_marshal() {
        assert_codec(&StdioMarshal, "marshal").await;
    }
}

mod msgpack {
    use super::*;

    /// Workers on the test interpreter, which has msgpack.
    pub struct StdioMsgpack;

    impl Target for StdioMsgpack {
        fn launcher(&self) -> Arc<dyn Launcher> {
            Arc::new(StdioLauncher::new())
        }
        fn python(&self) -> Option<String> {
            Some(std::env::var("PYPOOL_TEST_PYTHON").unwrap_or_else(|_| {
                panic!(
                    "the msgpack conformance run needs an interpreter with msgpack: run \
                     scripts/test.sh or set PYPOOL_TEST_PYTHON"
                )
            }))
        }
    }

    pool_testkit::conformance_suite!(StdioMsgpack);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_workers_speak_msgpack() {
        assert_codec(&StdioMsgpack, "msgpack").await;
    }
}
