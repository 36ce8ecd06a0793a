//! Driving many concurrent callers and summarising their latencies.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::task::JoinSet;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Latency {
    /// The summary of a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            mean: (h.mean() * 10.0).round() / 10.0,
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// One measured run of the workload.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Measurement {
    /// Until every worker was ready.
    pub startup_ms: f64,
    /// The timed calls, first to last.
    pub duration_ms: f64,
    /// Calls made.
    pub calls: u64,
    /// Calls that failed or returned the wrong bytes.
    pub errors: u64,
    /// Calls per second over `duration_ms`.
    pub throughput_per_s: f64,
    /// Per-call latency of the successful calls, as the caller saw it (queueing included).
    pub latency_us: Latency,
    /// The first error, when there were any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// What [`drive`] observed.
pub struct Driven {
    pub histogram: Histogram<u64>,
    pub calls: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub duration: Duration,
}

impl Driven {
    /// The measurement, given the start-up time measured before.
    pub fn measurement(&self, startup: Duration) -> Measurement {
        let seconds = self.duration.as_secs_f64();
        Measurement {
            startup_ms: crate::ui::ms(startup),
            duration_ms: crate::ui::ms(self.duration),
            calls: self.calls,
            errors: self.errors,
            throughput_per_s: if seconds > 0.0 {
                (self.calls as f64 / seconds * 10.0).round() / 10.0
            } else {
                0.0
            },
            latency_us: Latency::of(&self.histogram),
            first_error: self.first_error.clone(),
        }
    }
}

/// A histogram of microseconds from 1 µs to 1 hour at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

/// Runs `calls` calls from `concurrency` concurrent callers. `call(caller)` makes one call for
/// caller number `caller` and says whether it succeeded; its latency is recorded when it did.
pub async fn drive<F, Fut>(concurrency: usize, calls: u64, bar: &ProgressBar, call: F) -> Driven
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let call = Arc::new(call);
    let started = Instant::now();
    let mut callers = JoinSet::new();
    for caller in 0..concurrency {
        let next = next.clone();
        let call = call.clone();
        let bar = bar.clone();
        callers.spawn(async move {
            let mut histogram = histogram();
            let mut errors = 0u64;
            let mut first_error = None;
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let t0 = Instant::now();
                match call(caller).await {
                    Ok(()) => {
                        let us = t0.elapsed().as_micros().clamp(1, u64::MAX as u128) as u64;
                        histogram.saturating_record(us);
                    }
                    Err(err) => {
                        errors += 1;
                        first_error.get_or_insert(err);
                    }
                }
                bar.inc(1);
            }
            (histogram, errors, first_error)
        });
    }
    let mut total = histogram();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(joined) = callers.join_next().await {
        match joined {
            Ok((histogram, caller_errors, caller_first)) => {
                let _ = total.add(&histogram);
                errors += caller_errors;
                if first_error.is_none() {
                    first_error = caller_first;
                }
            }
            Err(err) => {
                errors += 1;
                first_error.get_or_insert(format!("a caller task failed: {err}"));
            }
        }
    }
    Driven {
        calls: total.len() + errors,
        histogram: total,
        errors,
        first_error,
        duration: started.elapsed(),
    }
}
