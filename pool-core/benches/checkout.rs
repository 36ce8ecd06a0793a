//! Checkout + call + release through the pool, next to deadpool managing an equivalent object.
//!
//! pypool's "call" here goes to a pool-testkit fake worker: protocol encode, an in-memory
//! channel, the fake's task, and back. deadpool's object is the same kind of thing without the
//! protocol: a channel to an echo task. The ratio shows what pypool's queueing, routing and
//! codec cost over the leanest pool in the ecosystem. Run: `cargo bench -p pool-core`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pool_core::{Pool, PoolConfig};
use pool_testkit::FakeLauncher;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

/// deadpool's object: a channel to a task that answers each request.
struct EchoConn {
    tx: mpsc::Sender<(u64, oneshot::Sender<u64>)>,
}

impl EchoConn {
    async fn call(&self, value: u64) -> u64 {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx
            .send((value, reply_tx))
            .await
            .expect("echo task alive");
        reply_rx.await.expect("echo task answers")
    }
}

struct EchoManager;

impl deadpool::managed::Manager for EchoManager {
    type Type = EchoConn;
    type Error = std::convert::Infallible;

    async fn create(&self) -> Result<EchoConn, Self::Error> {
        let (tx, mut rx) = mpsc::channel::<(u64, oneshot::Sender<u64>)>(64);
        tokio::spawn(async move {
            while let Some((value, reply)) = rx.recv().await {
                let _ = reply.send(value);
            }
        });
        Ok(EchoConn { tx })
    }

    async fn recycle(
        &self,
        _: &mut EchoConn,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<Self::Error> {
        Ok(())
    }
}

type EchoPool = deadpool::managed::Pool<EchoManager>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn pypool(rt: &tokio::runtime::Runtime, workers: usize) -> Pool {
    rt.block_on(async {
        let launcher = FakeLauncher::builder().build();
        let config = PoolConfig::new("bench")
            .size(workers)
            .max_waiters(20_000)
            .checkout_timeout(Duration::from_secs(600))
            .call_timeout(Duration::from_secs(600));
        Pool::start(config, launcher).await.expect("pool starts")
    })
}

fn deadpool(workers: usize) -> EchoPool {
    EchoPool::builder(EchoManager)
        .max_size(workers)
        .build()
        .expect("deadpool builds")
}

fn uncontended(c: &mut Criterion) {
    let rt = runtime();
    let pool = pypool(&rt, 1);
    let dp = deadpool(1);
    let mut group = c.benchmark_group("uncontended");
    group.bench_function("pypool/call", |b| {
        b.to_async(&rt)
            .iter(|| async { pool.call("echo", json!({"value": 1})).await.expect("call") })
    });
    group.bench_function("deadpool/get+call", |b| {
        b.to_async(&rt).iter(|| async {
            let conn = dp.get().await.expect("get");
            conn.call(1).await
        })
    });
    group.finish();
    rt.block_on(pool.shutdown(Duration::from_secs(1)));
}

fn contended(c: &mut Criterion) {
    const WAITERS: usize = 10_000;
    const WORKERS: usize = 16;
    let rt = runtime();
    let pool = pypool(&rt, WORKERS);
    let dp = deadpool(WORKERS);
    let mut group = c.benchmark_group("10k_waiters_16_workers");
    group.sample_size(10);
    group.throughput(Throughput::Elements(WAITERS as u64));
    group.bench_with_input(BenchmarkId::new("pypool", WAITERS), &WAITERS, |b, &n| {
        b.to_async(&rt).iter(|| {
            let pool = pool.clone();
            async move {
                let tasks: Vec<_> = (0..n)
                    .map(|i| {
                        let pool = pool.clone();
                        tokio::spawn(async move { pool.call("echo", json!({"value": i})).await })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("task").expect("call");
                }
            }
        })
    });
    let dp = Arc::new(dp);
    group.bench_with_input(BenchmarkId::new("deadpool", WAITERS), &WAITERS, |b, &n| {
        b.to_async(&rt).iter(|| {
            let dp = dp.clone();
            async move {
                let tasks: Vec<_> = (0..n)
                    .map(|i| {
                        let dp = dp.clone();
                        tokio::spawn(async move {
                            let conn = dp.get().await.expect("get");
                            conn.call(i as u64).await
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("task");
                }
            }
        })
    });
    group.finish();
    rt.block_on(pool.shutdown(Duration::from_secs(1)));
}

criterion_group!(benches, uncontended, contended);
criterion_main!(benches);
