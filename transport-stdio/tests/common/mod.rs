//! Helpers shared by the integration tests: specs, and the handshake and calls done by hand
//! with `pool_core::protocol`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pool_core::protocol::{decode, encode, Codec, Hello, Message, Welcome};
use pool_core::{Channel, WorkerSpec};
use serde_json::Value;

/// Upper bound for any single step; a hang fails the test instead of blocking the suite.
pub const STEP: Duration = Duration::from_secs(60);

pub fn conformance_app() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../pool-testkit/apps/conformance_app.py")
}

pub fn stdio_app() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/apps/stdio_app.py")
}

/// A spec for `app` with a worker id unique in this test binary.
pub fn spec(app: PathBuf) -> WorkerSpec {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    WorkerSpec::new(
        "stdio-tests",
        format!("w{n}"),
        app.to_string_lossy().into_owned(),
    )
}

pub async fn recv(channel: &mut Channel) -> Option<(Message, Vec<Bytes>)> {
    let frame = tokio::time::timeout(STEP, channel.receiver.recv())
        .await
        .expect("worker did not send a frame in time")
        .expect("reading a frame failed")?;
    Some(decode(frame).expect("worker sent an undecodable frame"))
}

pub async fn send(channel: &mut Channel, msg: &Message, attachments: &[Bytes]) {
    let body = encode(msg, Codec::Json, attachments).expect("encode");
    tokio::time::timeout(STEP, channel.sender.send(body))
        .await
        .expect("sending timed out")
        .expect("sending failed");
}

/// Reads HELLO and answers WELCOME (codec json), as the pool would.
pub async fn handshake(channel: &mut Channel, spec: &WorkerSpec) -> Hello {
    let hello = match recv(channel).await {
        Some((Message::Hello(hello), _)) => hello,
        other => panic!("expected HELLO, got {other:?}"),
    };
    let welcome = Message::Welcome(Welcome {
        codec: "json".to_owned(),
        pool: spec.pool.clone(),
        worker_id: spec.worker_id.clone(),
        max_frame: spec.max_frame as u64,
    });
    send(channel, &welcome, &[]).await;
    hello
}

/// Sends CALL and returns the `ok` value and attachments of its RESULT (panics on an error).
pub async fn call(
    channel: &mut Channel,
    id: u64,
    command: &str,
    args: Value,
    attachments: &[Bytes],
) -> (Value, Vec<Bytes>) {
    call_only(channel, id, command, args, attachments).await;
    match recv(channel).await {
        Some((
            Message::Result {
                id: reply_id,
                ok,
                error: None,
                ..
            },
            attachments,
        )) => {
            assert_eq!(reply_id, id);
            (ok.unwrap_or(Value::Null), attachments)
        }
        other => panic!("expected RESULT for {command}, got {other:?}"),
    }
}

/// Sends CALL without waiting for a reply.
pub async fn call_only(
    channel: &mut Channel,
    id: u64,
    command: &str,
    args: Value,
    attachments: &[Bytes],
) {
    let msg = Message::Call {
        id,
        command: command.to_owned(),
        args,
        session: None,
        timeout_ms: None,
        window: None,
        batch: false,
        scalars: false,
    };
    send(channel, &msg, attachments).await;
}

pub fn proc_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
