//! An HTTP service in Rust whose routes call Python: axum serves HTTP, a pypool pool of Python
//! workers runs the handlers in `handlers.py` beside this package.
//!
//! ```text
//! GET  /noop                                   -> {"result": null}        (handler `noop`)
//! POST /score  {"features": [0.5, 1.5, ...]}   -> {"score": 123.4}        (handler `score`)
//! ```
//!
//! Run it with `cargo run --release -p pypool-example-service -- --workers 2`, then
//! `curl localhost:8000/noop` and
//! `curl -d '{"features": [0.5, 1.5]}' -H 'content-type: application/json' localhost:8000/score`.
//! `load.sh` beside this package measures it against the same handlers served by uvicorn.
//!
//! Rust does everything that is not the handler: HTTP, parsing and validating the request
//! (a malformed body is refused here, without waking Python), queueing, time limits and
//! serializing the response. Python only runs the function. Pool errors map to HTTP statuses by
//! their [`pypool::ErrorKind`]; see [`ApiError`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use pypool::{Error, ErrorKind, Pool, TimeoutKind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The handlers module that ships with this example.
const HANDLERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/handlers.py");

/// An axum service whose routes call Python handlers through a pypool pool.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (port 0: any free port; the address is printed once serving).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Python worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Transport to the workers: stdio or ipc.
    #[arg(long, default_value = "stdio")]
    transport: String,
    /// Calls the pool may queue at a busy worker (PoolConfig::prefetch; 0 turns it off).
    #[arg(long, default_value_t = 64)]
    prefetch: usize,
    /// Caps the calls a worker runs at once (PoolConfig::max_in_flight; the worker's own
    /// announcement by default).
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// The longest a request waits for a worker before it gets 503.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    checkout_timeout: Duration,
    /// The longest a handler may run before the request gets 504 (the worker is cancelled).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
    /// The handlers module (a .py file or a dotted module name).
    #[arg(long, default_value = HANDLERS)]
    app: String,
    /// The Python interpreter (default: $PYPOOL_PYTHON, the active virtualenv, or python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Threads of the tokio runtime that serves HTTP and drives the pool (default: one per
    /// CPU). 1 runs everything on one thread (tokio's current-thread runtime).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let runtime = match args.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Some(threads) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?,
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let mut builder = pypool::builder(&args.app)
        .name("service")
        .transport(&args.transport)
        .size(args.workers)
        .checkout_timeout(args.checkout_timeout)
        .call_timeout(args.call_timeout)
        .require_commands(["noop", "score"])
        .prefetch(args.prefetch);
    if let Some(max) = args.max_in_flight {
        builder = builder.max_in_flight(max);
    }
    if let Some(python) = &args.python {
        builder = builder.python(python);
    }
    let pool = builder.start().await?;

    let app = Router::new()
        .route("/noop", get(noop))
        .route("/score", post(score))
        .with_state(pool.clone());
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    // One line on stdout once the pool is ready and the port is open: scripts and the smoke
    // test wait for it instead of polling.
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_signal())
        .await?;

    // In-flight requests have finished; let the workers finish theirs and exit.
    pool.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

/// SIGINT or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `GET /noop`: a call to a handler that does nothing; what the service adds to any call.
async fn noop(State(pool): State<Pool>) -> Result<Json<Value>, ApiError> {
    let reply = pool.call("noop", ()).await?;
    Ok(Json(json!({ "result": reply.value })))
}

/// The body of `POST /score`. axum refuses a body that does not parse (400/415/422) before any
/// Python runs.
#[derive(Debug, Serialize, Deserialize)]
struct ScoreRequest {
    features: Vec<f64>,
}

/// What the `score` handler returns, and the body of the response.
#[derive(Debug, Serialize, Deserialize)]
struct ScoreReply {
    score: f64,
}

/// `POST /score`: the Python handler `score(features)`, about 0.24 ms of pure-Python CPU.
async fn score(
    State(pool): State<Pool>,
    Json(request): Json<ScoreRequest>,
) -> Result<Json<ScoreReply>, ApiError> {
    Ok(Json(pool.call_as("score", &request).await?))
}

/// A pool error as an HTTP response, by its kind:
///
/// | pool error | status |
/// |---|---|
/// | overloaded (`max_waiters` reached), no worker free within `checkout_timeout`, breaker open, start-up failed, shutting down | 503, with `Retry-After: 1` |
/// | the handler ran past `call_timeout` (it was cancelled) | 504 |
/// | the worker died or broke the protocol (it is being replaced) | 502 |
/// | the handler raised an exception | 500 |
/// | anything else (a reply that does not have the expected shape...) | 500 |
///
/// The body is `{"error": kind, "message": text}`. Handler tracebacks go to the log, not to the
/// client.
#[derive(Debug)]
struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        ApiError(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let err = self.0;
        let (status, retry) = match err.kind() {
            ErrorKind::Overloaded | ErrorKind::Unavailable | ErrorKind::ShuttingDown => {
                (StatusCode::SERVICE_UNAVAILABLE, true)
            }
            ErrorKind::Timeout => match &err {
                Error::Timeout {
                    kind: TimeoutKind::Checkout,
                    ..
                } => (StatusCode::SERVICE_UNAVAILABLE, true),
                _ => (StatusCode::GATEWAY_TIMEOUT, false),
            },
            ErrorKind::WorkerFailed => (StatusCode::BAD_GATEWAY, false),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, false),
        };
        if status.is_server_error() && !retry {
            match &err {
                Error::Handler { error, .. } => tracing::error!(
                    error = %err,
                    traceback = error.traceback.as_deref().unwrap_or(""),
                    "request failed"
                ),
                _ => tracing::error!(error = %err, "request failed"),
            }
        }
        let message = match &err {
            Error::Handler { error, .. } => format!("{}: {}", error.kind, error.message),
            other => other.to_string(),
        };
        let body = Json(json!({ "error": format!("{:?}", err.kind()), "message": message }));
        if retry {
            (status, [(header::RETRY_AFTER, "1")], body).into_response()
        } else {
            (status, body).into_response()
        }
    }
}
