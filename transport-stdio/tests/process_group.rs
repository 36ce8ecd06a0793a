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

/// Not a test on its own: the "pool" process for `a_killed_pool_leaves_no_worker`. It launches a
/// worker, prints its pid and waits to be killed.
#[test]
fn helper_pool_process() {
    if std::env::var_os("PYPOOL_STDIO_HELPER").is_none() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let worker = runtime.block_on(async {
        let launcher = StdioLauncher::new();
        let spec = spec(conformance_app());
        let (mut channel, process) = launcher.launch_process(&spec).await.expect("launch");
        handshake(&mut channel, &spec).await;
        // On a line of its own: libtest may already have printed "test ... " on this one.
        println!("\nWORKER_PID {}", process.pid().expect("pid"));
        (channel, process)
    });
    // Wait to be killed; should the test die first, its end of stdin closes and we return
    // (dropping the worker), so a failed run leaves nothing behind either.
    let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
    drop(worker);
}

/// Kills and reaps the helper however the test ends.
struct Helper(std::process::Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_killed_pool_leaves_no_worker() {
    use std::io::BufRead;

    // SAFETY: plain prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER failed");

    let exe = std::env::current_exe().expect("current exe");
    let pool = std::process::Command::new(exe)
        .args([
            "--exact",
            "helper_pool_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PYPOOL_STDIO_HELPER", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the helper pool");
    let mut pool = Helper(pool);
    let stdout = pool.0.stdout.take().expect("stdout");
    let worker = tokio::time::timeout(
        STEP,
        tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|line| line.strip_prefix("WORKER_PID ")?.trim().parse().ok())
        }),
    )
    .await
    .expect("helper reported in time")
    .expect("join")
    .expect("helper printed the worker pid");

    // SIGKILL the pool: nothing of it can clean up; only the kernel's death signal can.
    pool.0.kill().expect("kill the helper");
    pool.0.wait().expect("reap the helper");

    // The worker was re-parented to us (subreaper); it must die of SIGKILL, not linger.
    let status = tokio::time::timeout(
        STEP,
        tokio::task::spawn_blocking(move || {
            let mut status = 0;
            // SAFETY: waitpid writes into `status`, which outlives the call.
            let rc = unsafe { libc::waitpid(worker, &mut status, 0) };
            (rc, status)
        }),
    )
    .await
    .expect("worker exit")
    .expect("join");
    assert_eq!(status.0, worker, "waitpid failed");
    assert!(libc::WIFSIGNALED(status.1), "worker status {:#x}", status.1);
    assert_eq!(libc::WTERMSIG(status.1), libc::SIGKILL);
}
