//! `PoolConfig::require_commands`: `Pool::start` checks the app against what the program needs.

mod common;

use common::*;
use pool_core::{Error, ErrorKind, Pool};
use pool_testkit::FakeLauncher;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn start_succeeds_when_every_required_command_is_served() {
    let launcher = FakeLauncher::builder().build();
    let pool = start(config(2).require_commands(["add", "echo"]), &launcher).await;
    assert!(pool.commands().contains(&"add".to_owned()));
    finish(pool, &launcher).await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_command_fails_start_at_the_first_handshake_with_a_suggestion() {
    // Four workers that each take 2 s to start, but the first HELLO already tells.
    let launcher = FakeLauncher::builder().start_delay(2 * SEC).build();
    let begun = Instant::now();
    let err = Pool::start(
        config(4).require_commands(["add", "ehco", "train_model"]),
        launcher.clone(),
    )
    .await
    .expect_err("start fails");
    assert_eq!(begun.elapsed(), 2 * SEC, "not after start_timeout");
    let Error::StartFailed { reason, .. } = &err else {
        panic!("expected StartFailed, got {err:?}");
    };
    assert!(
        reason.contains("'ehco' (did you mean 'echo'?), 'train_model'; it serves: "),
        "{reason}"
    );
    assert!(!reason.contains("'add'"), "{reason}");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    // A failed start leaves nothing behind.
    launcher.assert_all_gone();
}

#[tokio::test(start_paused = true)]
async fn with_min_ready_zero_start_still_waits_for_one_worker_to_check() {
    let launcher = FakeLauncher::builder().start_delay(SEC).build();
    let err = Pool::start(
        config(2).min_ready(0).require_commands(["nope"]),
        launcher.clone(),
    )
    .await
    .expect_err("start fails");
    assert!(err.to_string().contains("'nope'"), "{err}");
    launcher.assert_all_gone();

    // Without required commands, min_ready 0 returns at once, as before.
    let begun = Instant::now();
    let pool = start(config(2).min_ready(0), &launcher).await;
    assert_eq!(begun.elapsed(), std::time::Duration::ZERO);
    finish(pool, &launcher).await;
}
