//! The workload, driving many concurrent callers, and summarising repeated runs: medians,
//! spreads, speed-ups.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::{Serialize, Serializer};
use tokio::task::JoinSet;

/// The workload, as given on the command line.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub workers: usize,
    pub concurrency: usize,
    pub calls: u64,
    /// 0: the no-op (a small int in, the same int out); otherwise the size of a binary echo.
    pub payload: usize,
    /// Items per chunk in the map modes; 0 for the pool's automatic choice.
    pub chunksize: usize,
}

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
    /// Calls that failed or returned the wrong result.
    pub errors: u64,
    /// Calls per second over `duration_ms`.
    pub throughput_per_s: f64,
    /// Per-call latency of the successful calls, as the caller saw it (queueing included);
    /// `None` for a workload that has no per-call latency (a whole batch handed to `map`).
    pub latency_us: Option<Latency>,
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
    /// Whether the histogram holds each call's latency (not for a map: its items have none).
    pub per_call_latency: bool,
}

impl Driven {
    /// The measurement, given the start-up time measured before.
    pub fn measurement(&self, startup: Duration) -> Measurement {
        let seconds = self.duration.as_secs_f64();
        Measurement {
            startup_ms: ms(startup),
            duration_ms: ms(self.duration),
            calls: self.calls,
            errors: self.errors,
            throughput_per_s: if seconds > 0.0 {
                (self.calls as f64 / seconds * 10.0).round() / 10.0
            } else {
                0.0
            },
            latency_us: self.per_call_latency.then(|| Latency::of(&self.histogram)),
            first_error: self.first_error.clone(),
        }
    }
}

/// A histogram of microseconds from 1 µs to 1 hour at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

/// Runs `calls` calls from `concurrency` concurrent callers. `call(caller, index)` makes call
/// number `index` (0 to `calls - 1`, each once) for caller number `caller` and says whether it
/// succeeded; its latency is recorded when it did.
pub async fn drive<F, Fut>(concurrency: usize, calls: u64, bar: &ProgressBar, call: F) -> Driven
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
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
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= calls {
                    break;
                }
                let t0 = Instant::now();
                match call(caller, index).await {
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
        per_call_latency: true,
    }
}

/// The median of some values (the mean of the middle two for an even count), and their range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figure {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Figure {
    /// `None` when there are no values.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Figure> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Figure {
            median: round3(median),
            min: round3(v[0]),
            max: round3(v[n - 1]),
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `[min, max]` in JSON.
#[derive(Debug, Clone, Copy)]
pub struct Range(pub f64, pub f64);

impl Serialize for Range {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        [self.0, self.1].serialize(s)
    }
}

impl From<Figure> for Range {
    fn from(f: Figure) -> Self {
        Range(f.min, f.max)
    }
}

/// The range of each latency figure over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySpread {
    pub mean: Range,
    pub p50: Range,
    pub p99: Range,
    pub p999: Range,
}

/// The range over the runs of each figure whose median [`Summary`] gives.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub startup_ms: Range,
    pub throughput_per_s: Range,
    pub latency_us: Option<LatencySpread>,
}

/// One contender's runs: every figure is the median over the runs, `spread` has their ranges
/// and `runs` every run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Start-up (median).
    pub startup_ms: f64,
    /// Duration of the timed calls (median).
    pub duration_ms: f64,
    /// Calls per run.
    pub calls: u64,
    /// Failed calls over all runs.
    pub errors: u64,
    /// Calls per second (median).
    pub throughput_per_s: f64,
    /// Each latency figure's median, `None` when the workload has no per-call latency.
    pub latency_us: Option<Latency>,
    /// The first error of any run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Ranges (min, max) over the runs.
    pub spread: Spread,
    /// Every run, in order.
    pub runs: Vec<Measurement>,
}

impl Summary {
    /// The summary of at least one run.
    pub fn of(runs: Vec<Measurement>) -> Summary {
        let fig = |f: &dyn Fn(&Measurement) -> Option<f64>| Figure::of(runs.iter().filter_map(f));
        let zero = Figure {
            median: 0.0,
            min: 0.0,
            max: 0.0,
        };
        let startup = fig(&|m| Some(m.startup_ms)).unwrap_or(zero);
        let duration = fig(&|m| Some(m.duration_ms)).unwrap_or(zero);
        let throughput = fig(&|m| Some(m.throughput_per_s)).unwrap_or(zero);
        let has_latency = !runs.is_empty() && runs.iter().all(|m| m.latency_us.is_some());
        let lat = |f: fn(&Latency) -> f64| fig(&|m| m.latency_us.as_ref().map(f)).unwrap_or(zero);
        let (latency, latency_spread) = if has_latency {
            let (mean, p50, p99, p999, max) = (
                lat(|l| l.mean),
                lat(|l| l.p50 as f64),
                lat(|l| l.p99 as f64),
                lat(|l| l.p999 as f64),
                lat(|l| l.max as f64),
            );
            (
                Some(Latency {
                    mean: (mean.median * 10.0).round() / 10.0,
                    p50: p50.median.round() as u64,
                    p99: p99.median.round() as u64,
                    p999: p999.median.round() as u64,
                    max: max.median.round() as u64,
                }),
                Some(LatencySpread {
                    mean: mean.into(),
                    p50: p50.into(),
                    p99: p99.into(),
                    p999: p999.into(),
                }),
            )
        } else {
            (None, None)
        };
        Summary {
            startup_ms: startup.median,
            duration_ms: duration.median,
            calls: runs.first().map(|m| m.calls).unwrap_or(0),
            errors: runs.iter().map(|m| m.errors).sum(),
            throughput_per_s: (throughput.median * 10.0).round() / 10.0,
            latency_us: latency,
            first_error: runs.iter().find_map(|m| m.first_error.clone()),
            spread: Spread {
                startup_ms: startup.into(),
                throughput_per_s: throughput.into(),
                latency_us: latency_spread,
            },
            runs,
        }
    }
}

/// How much faster pypool is than a baseline, figure by figure, always in the same direction:
/// above 1, pypool is that many times faster (more calls per second, or a shorter latency);
/// below 1, it is 1/that many times slower. Computed per round (pypool's run and the baseline's
/// run of the same round, made back to back) and summarised as median and range over the
/// rounds; `None` where the baseline has no such figure.
#[derive(Debug, Clone, Serialize)]
pub struct Speedup {
    /// pypool's throughput / the baseline's.
    pub throughput: Option<Figure>,
    /// The baseline's mean latency / pypool's.
    pub mean: Option<Figure>,
    /// The baseline's median latency / pypool's.
    pub p50: Option<Figure>,
    /// The baseline's 99th-percentile latency / pypool's.
    pub p99: Option<Figure>,
}

impl Speedup {
    /// Pairs the runs of each round.
    pub fn between(pypool: &[Measurement], baseline: &[Measurement]) -> Speedup {
        let pairs = || pypool.iter().zip(baseline);
        let ratio = |a: f64, b: f64| (a > 0.0 && b > 0.0).then(|| a / b);
        let latency = |f: fn(&Latency) -> f64| {
            Figure::of(pairs().filter_map(|(p, b)| {
                let (p, b) = (p.latency_us.as_ref()?, b.latency_us.as_ref()?);
                ratio(f(b), f(p))
            }))
        };
        Speedup {
            throughput: Figure::of(
                pairs().filter_map(|(p, b)| ratio(p.throughput_per_s, b.throughput_per_s)),
            ),
            mean: latency(|l| l.mean),
            p50: latency(|l| l.p50 as f64),
            p99: latency(|l| l.p99 as f64),
        }
    }
}

/// Milliseconds with three decimals, for JSON.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(throughput: f64, mean: Option<f64>) -> Measurement {
        Measurement {
            startup_ms: 10.0,
            duration_ms: 100.0,
            calls: 100,
            errors: 0,
            throughput_per_s: throughput,
            latency_us: mean.map(|mean| Latency {
                mean,
                p50: mean as u64,
                p99: 2 * mean as u64,
                p999: 3 * mean as u64,
                max: 4 * mean as u64,
            }),
            first_error: None,
        }
    }

    #[test]
    fn medians_and_ranges() {
        let f = Figure::of([3.0, 1.0, 2.0]).unwrap();
        assert_eq!((f.median, f.min, f.max), (2.0, 1.0, 3.0));
        let f = Figure::of([4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(f.median, 2.5);
        assert!(Figure::of([]).is_none());
    }

    #[test]
    fn a_summary_is_the_median_run_figure_by_figure() {
        let s = Summary::of(vec![
            run(100.0, Some(10.0)),
            run(300.0, Some(30.0)),
            run(200.0, Some(20.0)),
        ]);
        assert_eq!(s.throughput_per_s, 200.0);
        assert_eq!(s.latency_us.as_ref().unwrap().mean, 20.0);
        assert_eq!(s.spread.throughput_per_s.0, 100.0);
        assert_eq!(s.spread.throughput_per_s.1, 300.0);
        assert_eq!(s.runs.len(), 3);
        assert!(Summary::of(vec![run(1.0, None)]).latency_us.is_none());
    }

    #[test]
    fn speedups_point_the_same_way_for_throughput_and_latency() {
        // pypool: twice the throughput and half the latency of the baseline: 2x faster on both.
        let pypool = [run(200.0, Some(10.0))];
        let baseline = [run(100.0, Some(20.0))];
        let s = Speedup::between(&pypool, &baseline);
        assert_eq!(s.throughput.unwrap().median, 2.0);
        assert_eq!(s.mean.unwrap().median, 2.0);
        // And no latency figure against a baseline without per-call latency.
        let s = Speedup::between(&pypool, &[run(400.0, None)]);
        assert_eq!(s.throughput.unwrap().median, 0.5);
        assert!(s.mean.is_none());
    }
}
