//! What the library asks of a program: the examples from issue 12 that did not compile, now
//! written the way a user writes them, on pool-testkit's fake workers (paused time).

use std::time::Duration;

use futures::future::join_all;
use pool_testkit::FakeLauncher;
use pypool::{Error, ErrorKind, Payload, Pool};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Serialize)]
struct Sum {
    a: i64,
    b: i64,
}

/// `?` on every step inside a function returning `pypool::Result`.
async fn add_in_steps(pool: &Pool, a: i64, b: i64) -> pypool::Result<i64> {
    let _launcher = pypool::launcher("stdio")?;
    let args = Payload::from_serialize(&Sum { a, b })?;
    let reply = pool.call("add", args).await?;
    let sum: i64 = reply.deserialize()?;
    Ok(sum)
}

#[tokio::test(start_paused = true)]
async fn typed_calls_and_question_marks() {
    let launcher = FakeLauncher::builder().build();
    let pool = pypool::builder("fake_app")
        .size(2)
        .launcher(launcher.clone())
        .require_commands(["add", "echo"])
        .start()
        .await
        .expect("the pool starts");

    assert_eq!(add_in_steps(&pool, 2, 40).await.expect("add"), 42);
    let sum: i64 = pool.call_as("add", &Sum { a: 1, b: 2 }).await.expect("add");
    assert_eq!(sum, 3);

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct NotANumber {
        x: String,
    }
    let err = pool
        .call_as::<NotANumber>("add", &Sum { a: 1, b: 2 })
        .await
        .expect_err("3 is not a struct");
    assert!(matches!(err, Error::Codec(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);

    let err = pool
        .call("ad", json!({}))
        .await
        .expect_err("no such command");
    match &err {
        Error::UnknownCommand {
            suggestion, known, ..
        } => {
            assert_eq!(suggestion.as_deref(), Some("add"));
            assert!(known.contains(&"echo".to_owned()));
        }
        other => panic!("expected UnknownCommand, got {other:?}"),
    }

    pool.shutdown(Duration::from_secs(1)).await;
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn sessions_work_as_temporaries() {
    let launcher = FakeLauncher::builder().build();
    let pool = pypool::builder("fake_app")
        .size(3)
        .default_affinity(pypool::Affinity::Strict)
        .launcher(launcher.clone())
        .start()
        .await
        .expect("the pool starts");
    let id = |i: usize| format!("user-{i}");
    // The futures own what they need: the session handles are temporaries.
    let stored = (0..6).map(|i| {
        pool.session(id(i))
            .call("remember", json!({"key": "n", "value": i}))
    });
    for result in join_all(stored).await {
        result.expect("remember");
    }
    let recalled: Vec<_> = (0..6)
        .map(|i| {
            pool.session(id(i))
                .call_as::<usize>("recall", &json!({"key": "n"}))
        })
        .collect();
    let values: Vec<usize> = join_all(recalled)
        .await
        .into_iter()
        .map(|r| r.expect("recall"))
        .collect();
    assert_eq!(values, (0..6).collect::<Vec<_>>());
    assert_eq!(pool.status().sessions.len(), 6);

    pool.shutdown(Duration::from_secs(1)).await;
    launcher.assert_all_gone();
}
