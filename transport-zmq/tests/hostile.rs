//! Peers that attack the ZMTP layer itself, below pypool's JOIN: they must cost the pool neither
//! its life nor unbounded memory, and must not disturb the workers it serves.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{app, RemoteWorker, SecretFile, STEP};
use pool_core::{Pool, PoolConfig};
use serde_json::json;
use transport_zmq::ZmqLauncher;

/// A ZMTP 3.0 greeting for the NULL mechanism, as a client.
fn greeting() -> Vec<u8> {
    let mut g = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
    let mut mechanism = b"NULL".to_vec();
    mechanism.resize(20, 0);
    g.extend_from_slice(&mechanism);
    g.push(0); // as-server
    g.resize(64, 0);
    g
}

/// A READY command announcing a DEALER with `identity`.
fn ready(identity: &[u8]) -> Vec<u8> {
    let mut body = vec![5];
    body.extend_from_slice(b"READY");
    for (name, value) in [
        (&b"Socket-Type"[..], &b"DEALER"[..]),
        (b"Identity", identity),
    ] {
        body.push(name.len() as u8);
        body.extend_from_slice(name);
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut frame = vec![0x04, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

fn connect(endpoint: &str) -> TcpStream {
    let addr = endpoint.trim_start_matches("tcp://");
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(STEP)).expect("timeout");
    stream
}

/// Reads until the pool closes the connection (or the step bound passes: a failure).
fn expect_closed(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(err) => panic!("the pool did not close the connection: {err}"),
        }
    }
}

/// Short, so that a peer that stalls is seen dropped quickly.
const AUTH_TIMEOUT: Duration = Duration::from_millis(500);

async fn serving_pool() -> (
    Pool,
    std::sync::Arc<transport_zmq::ZmqLauncher>,
    String,
    RemoteWorker,
    SecretFile,
) {
    let secret = SecretFile::new();
    let launcher = std::sync::Arc::new(
        ZmqLauncher::remote("127.0.0.1:0", secret.key.clone()).auth_timeout(AUTH_TIMEOUT),
    );
    let endpoint = launcher.bind().await.expect("bind");
    let worker = RemoteWorker::start(&endpoint, &secret.path, &app(), &[]);
    let config = PoolConfig::new(app())
        .size(1)
        .start_timeout(Duration::from_secs(60));
    let pool = Pool::start(config, launcher.clone()).await.expect("start");
    (pool, launcher, endpoint, worker, secret)
}

async fn assert_serves(pool: &Pool) {
    let reply = tokio::time::timeout(STEP, pool.call("echo", json!({"value": 7})))
        .await
        .expect("the call did not finish")
        .expect("call");
    assert_eq!(reply.value, json!(7));
}

async fn finish(pool: Pool, launcher: &transport_zmq::ZmqLauncher, worker: RemoteWorker) {
    pool.shutdown(Duration::from_secs(10)).await;
    pool_core::Launcher::shutdown(launcher).await;
    let pid = worker.pid;
    let (status, stderr) = worker.finish().await;
    assert!(status.success(), "worker {pid}: {status}: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_announcing_a_terabyte_is_refused_before_allocation() {
    let (pool, launcher, endpoint, worker, _secret) = serving_pool().await;
    let attack = tokio::task::spawn_blocking(move || {
        let mut stream = connect(&endpoint);
        stream.write_all(&greeting()).expect("greeting");
        stream.write_all(&ready(b"attacker")).expect("ready");
        // A long message frame announcing 1 TiB, then a trickle of bytes.
        let mut header = vec![0x02];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        stream.write_all(&header).expect("header");
        let _ = stream.write_all(&[0u8; 1024]);
        expect_closed(stream);
    });
    tokio::time::timeout(STEP, attack)
        .await
        .expect("attack")
        .expect("join");
    assert_serves(&pool).await;
    finish(pool, &launcher, worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_after_a_fake_join_waits_for_a_verdict_that_never_comes() {
    let (pool, launcher, endpoint, worker, _secret) = serving_pool().await;
    let attack = tokio::task::spawn_blocking(move || {
        let mut stream = connect(&endpoint);
        stream.write_all(&greeting()).expect("greeting");
        stream.write_all(&ready(b"pretender")).expect("ready");
        // Two messages that look like JOIN and AUTH (but are not), then 1 GiB announced.
        stream
            .write_all(&[0x00, 1, b'j', 0x00, 1, b'a'])
            .expect("messages");
        let mut header = vec![0x02];
        header.extend_from_slice(&(1u64 << 30).to_be_bytes());
        stream.write_all(&header).expect("header");
        let started = std::time::Instant::now();
        expect_closed(stream);
        started.elapsed()
    });
    let waited = tokio::time::timeout(STEP, attack)
        .await
        .expect("attack")
        .expect("join");
    assert!(waited < STEP, "held for {waited:?}");
    assert_serves(&pool).await;
    finish(pool, &launcher, worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_its_handshake_is_closed() {
    let (pool, launcher, endpoint, worker, _secret) = serving_pool().await;
    let attack = tokio::task::spawn_blocking(move || {
        let mut stream = connect(&endpoint);
        // Half a greeting, then silence.
        stream
            .write_all(&greeting()[..20])
            .expect("partial greeting");
        let started = std::time::Instant::now();
        expect_closed(stream);
        started.elapsed()
    });
    let waited = tokio::time::timeout(STEP, attack)
        .await
        .expect("attack")
        .expect("join");
    assert!(waited >= AUTH_TIMEOUT / 2, "closed after {waited:?}");
    assert_serves(&pool).await;
    finish(pool, &launcher, worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_floods_of_strangers_cost_the_pool_nothing() {
    let (pool, launcher, endpoint, worker, _secret) = serving_pool().await;
    let attack = tokio::task::spawn_blocking(move || {
        let mut garbage = connect(&endpoint);
        garbage
            .write_all(b"GET / HTTP/1.1\r\nHost: pool\r\n\r\n")
            .expect("garbage");
        expect_closed(garbage);
        // 100 strangers at once, each sending a message before READY... then one that speaks
        // ZMTP but floods small frames before joining.
        let strangers: Vec<TcpStream> = (0..100)
            .map(|_| {
                let mut s = connect(&endpoint);
                s.write_all(&greeting()).expect("greeting");
                s.write_all(&[0x00, 1, b'x']).expect("message");
                s
            })
            .collect();
        for s in strangers {
            expect_closed(s);
        }
        let mut flood = connect(&endpoint);
        flood.write_all(&greeting()).expect("greeting");
        flood.write_all(&ready(b"flooder")).expect("ready");
        let frames: Vec<u8> = (0..10_000).flat_map(|_| [0x01, 0]).collect();
        let _ = flood.write_all(&frames);
        expect_closed(flood);
    });
    tokio::time::timeout(STEP, attack)
        .await
        .expect("attack")
        .expect("join");
    assert_serves(&pool).await;
    assert_eq!(pool.stats().counters.crashes, 0);
    finish(pool, &launcher, worker).await;
}
