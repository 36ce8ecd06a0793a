//! `kill()` reaches everything in the worker's process group.
//!
//! This test binary makes itself a child subreaper, so a grandchild orphaned by the worker's
//! death becomes our child and we can wait for it (and see how it died) without polling. It is a
//! separate binary so that the setting affects no other test.

mod common;

use common::*;
use pool_core::ProcessHandle;
use serde_json::json;
use transport_stdio::StdioLauncher;

#[tokio::test]
async fn kill_reaches_the_grandchild() {
    // SAFETY: plain prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER failed");

    let launcher = StdioLauncher::new();
    let spec = spec(stdio_app());
    let (mut channel, process) = launcher.launch_process(&spec).await.expect("launch");
    handshake(&mut channel, &spec).await;
    let pid = process.pid().expect("pid");
    let (grandchild, _) = call(&mut channel, 1, "spawn_sleeper", json!([]), &[]).await;
    let grandchild = grandchild.as_i64().expect("a pid") as libc::pid_t;
    let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).expect("stat");
    // Field 5 (after the parenthesised command name) is the process group.
    let pgrp: u32 = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(2))
        .and_then(|f| f.parse().ok())
        .expect("pgrp");
    assert_eq!(pgrp, pid, "the grandchild is in the worker's group");

    process.kill();
    let exit = tokio::time::timeout(STEP, process.wait())
        .await
        .expect("exit");
    assert_eq!(exit.signal, Some(9), "{exit}");

    // The worker is reaped, so the grandchild has been re-parented to us: wait for it.
    let status = tokio::time::timeout(
        STEP,
        tokio::task::spawn_blocking(move || {
            let mut status = 0;
            // SAFETY: waitpid writes into `status`, which outlives the call.
            let rc = unsafe { libc::waitpid(grandchild, &mut status, 0) };
            (rc, status)
        }),
    )
    .await
    .expect("grandchild exit")
    .expect("join");
    assert_eq!(status.0, grandchild, "waitpid failed");
    assert!(
        libc::WIFSIGNALED(status.1),
        "grandchild status {:#x}",
        status.1
    );
    assert_eq!(libc::WTERMSIG(status.1), libc::SIGKILL);
    assert!(!proc_exists(grandchild as u32));
    assert!(!proc_exists(pid));
}
