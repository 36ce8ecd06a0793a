//! Output: failures and exit codes, progress bars, tables and number formatting.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::measure::Figure;
use crate::Global;

/// Exit code: the command ran but failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage (clap uses 2 as well).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: workers could not start.
pub const EXIT_START: u8 = 3;

/// Why a command ends with a non-zero exit code, and what to tell the user.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// Printed on stderr as `error: ...` (nothing if empty: already printed).
    pub message: String,
    /// Printed on stdout with --json instead of the default `{"ok": false, "error": ...}`.
    pub json: Option<Value>,
    /// The command already printed its JSON object: print no other.
    pub json_printed: bool,
}

impl Failure {
    /// A failure with exit code 1.
    pub fn failed(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_FAILED,
            message: message.into(),
            json: None,
            json_printed: false,
        }
    }

    /// A usage error (exit code 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
            json: None,
            json_printed: false,
        }
    }

    /// Workers could not start (exit code 3).
    pub fn start(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_START,
            message: message.into(),
            json: None,
            json_printed: false,
        }
    }

    /// Replaces the JSON printed with --json.
    pub fn with_json(mut self, value: Value) -> Self {
        self.json = Some(value);
        self
    }

    /// Marks the JSON output as already printed.
    pub fn json_printed(mut self) -> Self {
        self.json_printed = true;
        self
    }

    /// Prints the failure and returns its exit code.
    pub fn report(self, json: bool) -> ExitCode {
        if !self.message.is_empty() {
            eprintln!("error: {}", self.message);
        }
        if json && !self.json_printed {
            let value = self.json.unwrap_or_else(
                || json!({"ok": false, "error": {"message": self.message, "exit_code": self.code}}),
            );
            println!("{value}");
        }
        ExitCode::from(self.code)
    }
}

impl From<pypool::Error> for Failure {
    fn from(err: pypool::Error) -> Self {
        match err {
            pypool::Error::StartFailed { .. } => Failure::start(err.to_string()),
            other => Failure::failed(other.to_string()),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Failure::failed(err.to_string())
    }
}

impl From<pypool::UnknownTransport> for Failure {
    fn from(err: pypool::UnknownTransport) -> Self {
        Failure::usage(err.to_string())
    }
}

/// The short name of an error's kind, for structured output.
pub fn error_kind(err: &pypool::Error) -> &'static str {
    use pypool::Error::*;
    match err {
        Saturated { .. } => "Saturated",
        WorkerBusy { .. } => "WorkerBusy",
        Timeout { .. } => "Timeout",
        Handler { .. } => "Handler",
        WorkerCrashed { .. } => "WorkerCrashed",
        SessionWorkerLost { .. } => "SessionWorkerLost",
        CircuitOpen { .. } => "CircuitOpen",
        StartFailed { .. } => "StartFailed",
        ShuttingDown { .. } => "ShuttingDown",
        SessionEnded { .. } => "SessionEnded",
        Protocol { .. } => "Protocol",
        RequestTooLarge { .. } => "RequestTooLarge",
        ReplyTooLarge { .. } => "ReplyTooLarge",
        InvalidArguments { .. } => "InvalidArguments",
        UnknownCommand { .. } => "UnknownCommand",
        Codec(_) => "Codec",
        TooManySessions { .. } => "TooManySessions",
        InvalidConfig(_) => "InvalidConfig",
        _ => "PoolError",
    }
}

/// A pool error as JSON: `{"type", "message", "traceback"}` for handler exceptions (the
/// worker's own structured error), `{"type": <error kind>, "message"}` otherwise.
pub fn error_json(err: &pypool::Error) -> Value {
    match err {
        pypool::Error::Handler { error, worker, .. } => json!({
            "type": error.kind,
            "message": error.message,
            "traceback": error.traceback,
            "worker": worker,
            "source": "handler",
        }),
        other => json!({
            "type": error_kind(other),
            "message": other.to_string(),
            "traceback": null,
            "source": "pool",
        }),
    }
}

/// Progress display: real bars on a terminal, hidden ones otherwise (or with --json).
#[derive(Debug, Clone, Copy)]
pub struct Ui {
    interactive: bool,
    /// Whether --json was given.
    pub json: bool,
}

impl Ui {
    /// Decides from the options and the terminal.
    pub fn new(global: &Global) -> Self {
        Ui {
            interactive: !global.json
                && std::io::stdout().is_terminal()
                && std::io::stderr().is_terminal(),
            json: global.json,
        }
    }

    /// A spinner with a message and the elapsed time, for steps of unknown length.
    pub fn spinner(&self, message: impl Into<Cow<'static, str>>) -> ProgressBar {
        if !self.interactive {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner:.cyan} {msg} {elapsed:.dim}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    }

    /// A bar over `len` steps.
    pub fn bar(&self, len: u64, message: impl Into<Cow<'static, str>>) -> ProgressBar {
        if !self.interactive {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len).with_style(
            ProgressStyle::with_template(
                "{spinner:.cyan} {msg} [{bar:30.cyan/blue}] {human_pos}/{human_len} ({rate}, {eta} left)",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{}", fmt_rate(state.per_sec()));
                },
            )
            .progress_chars("=> "),
        );
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    }
}

/// The widest a table may be: it fits a 100-column terminal.
pub const MAX_WIDTH: usize = 100;

/// Lays out rows under headers (with `comfy-table`), at most [`MAX_WIDTH`] columns wide
/// including `indent`: headers wrap at spaces to their column's width, and columns are two
/// spaces apart, or one when two would not fit. Columns whose cells all look numeric are
/// right-aligned.
pub fn table(headers: &[&str], rows: &[Vec<String>], indent: usize) -> String {
    use comfy_table::{presets::NOTHING, CellAlignment, ContentArrangement, Table};
    let width = |s: &str| s.chars().count();
    let columns = headers.len();
    let mut numeric = vec![true; columns];
    let mut cells = vec![0usize; columns];
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            cells[i] = cells[i].max(width(cell));
            numeric[i] &= cell
                .chars()
                .next()
                .is_none_or(|c| c.is_ascii_digit() || c == '-' || c == '—');
        }
    }
    let gaps = columns.saturating_sub(1);
    let natural = |headers: &[String]| -> usize {
        headers
            .iter()
            .zip(&cells)
            .map(|(header, &cell)| header.lines().map(width).max().unwrap_or(0).max(cell))
            .sum()
    };
    let mut headers: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    if indent + natural(&headers) + 2 * gaps > MAX_WIDTH {
        // Too wide: headers wider than their column's cells wrap at spaces.
        headers = headers
            .iter()
            .zip(&cells)
            .map(|(header, &cell)| {
                let target = header.split(' ').map(width).max().unwrap_or(0).max(cell);
                wrap(header, target)
            })
            .collect();
    }
    let natural = natural(&headers);
    let gap = if indent + natural + 2 * gaps <= MAX_WIDTH {
        2
    } else {
        1
    };
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(headers);
    if indent + natural + gap * gaps > MAX_WIDTH {
        // Still too wide: let comfy-table wrap cells too.
        table
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_width(u16::try_from(MAX_WIDTH.saturating_sub(indent)).unwrap_or(u16::MAX));
    }
    for row in rows {
        table.add_row(row.iter().take(columns).cloned().collect::<Vec<_>>());
    }
    for (i, column) in table.column_iter_mut().enumerate() {
        column.set_padding((if i == 0 { 0 } else { gap as u16 }, 0));
        if numeric.get(i).copied().unwrap_or(false) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(&" ".repeat(indent));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `text` broken at spaces into lines of at most `target` characters (a longer word keeps its
/// own line).
pub fn wrap(text: &str, target: usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= target => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_owned()),
        }
    }
    lines.join("\n")
}

/// Microseconds, in the unit that reads best.
pub fn fmt_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}µs")
    } else if us < 10_000.0 {
        format!("{:.2}ms", us / 1e3)
    } else if us < 1_000_000.0 {
        format!("{:.1}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

/// A duration, in the unit that reads best.
pub fn fmt_duration(d: Duration) -> String {
    fmt_us(d.as_secs_f64() * 1e6)
}

/// A whole number with thousands separators.
pub fn fmt_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate per second.
pub fn fmt_rate(per_second: f64) -> String {
    if per_second >= 100.0 || per_second == 0.0 {
        format!("{}/s", fmt_count(per_second.round() as u64))
    } else {
        format!("{per_second:.1}/s")
    }
}

/// A byte count in binary units.
pub fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A rate in short form for ranges: `950`, `12.3k`, `1.25M`.
pub fn fmt_rate_short(per_second: f64) -> String {
    if per_second >= 1e6 {
        format!("{:.2}M", per_second / 1e6)
    } else if per_second >= 1e4 {
        format!("{:.1}k", per_second / 1e3)
    } else if per_second >= 1e3 {
        format!("{:.2}k", per_second / 1e3)
    } else {
        format!("{per_second:.0}")
    }
}

/// The range of a rate over runs: `58.1k–63.0k`.
pub fn fmt_rate_range(min: f64, max: f64) -> String {
    format!("{}–{}", fmt_rate_short(min), fmt_rate_short(max))
}

/// How pypool compares with a baseline, from a speed-up (above 1: pypool faster by that
/// factor; below 1: slower by its inverse), in words that cannot be misread: `1.90x faster`,
/// `1.30x slower`; with `range`, the range over the runs in the same direction as the median:
/// `1.90x faster [1.80–2.05]` (a factor of 0.95 "faster" in the range is a run where pypool was
/// slower). `—` when there is no such figure.
pub fn fmt_speedup(speedup: Option<&Figure>, range: bool) -> String {
    let Some(f) = speedup.filter(|f| f.median.is_finite() && f.median > 0.0) else {
        return "—".to_owned();
    };
    let (word, median, lo, hi) = if f.median >= 1.0 {
        ("faster", f.median, f.min, f.max)
    } else {
        ("slower", 1.0 / f.median, 1.0 / f.max, 1.0 / f.min)
    };
    if range && (lo - hi).abs() >= 0.005 {
        format!(
            "{}x {word} [{}–{}]",
            three_digits(median),
            three_digits(lo),
            three_digits(hi)
        )
    } else {
        format!("{}x {word}", three_digits(median))
    }
}

/// A factor with three significant digits (two decimals at most): 1.23, 12.3, 123.
fn three_digits(x: f64) -> String {
    if x < 10.0 {
        format!("{x:.2}")
    } else if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_count(0), "0");
        assert_eq!(fmt_count(1234567), "1,234,567");
        assert_eq!(fmt_us(812.0), "812µs");
        assert_eq!(fmt_us(3_200.0), "3.20ms");
        assert_eq!(fmt_us(1_500_000.0), "1.50s");
        assert_eq!(fmt_bytes(2048), "2.0 KiB");
        assert_eq!(fmt_rate_range(58_123.0, 1_250_000.0), "58.1k–1.25M");
    }

    #[test]
    fn speedups_say_faster_or_slower() {
        let f = |median, min, max| Figure { median, min, max };
        assert_eq!(fmt_speedup(Some(&f(1.9, 1.8, 2.0)), false), "1.90x faster");
        assert_eq!(
            fmt_speedup(Some(&f(1.9, 1.8, 2.0)), true),
            "1.90x faster [1.80–2.00]"
        );
        // 0.5 = half as fast: 2x slower; the range is in the same direction.
        assert_eq!(
            fmt_speedup(Some(&f(0.5, 0.25, 0.8)), true),
            "2.00x slower [1.25–4.00]"
        );
        assert_eq!(fmt_speedup(Some(&f(2.0, 2.0, 2.0)), true), "2.00x faster");
        assert_eq!(
            fmt_speedup(Some(&f(0.021, 0.018, 0.026)), true),
            "47.6x slower [38.5–55.6]"
        );
        assert_eq!(fmt_speedup(None, true), "—");
    }

    #[test]
    fn tables_align() {
        let out = table(
            &["id", "calls"],
            &[
                vec!["w1".into(), "5".into()],
                vec!["w10".into(), "120".into()],
            ],
            2,
        );
        assert_eq!(out, "  id   calls\n  w1       5\n  w10    120\n");
    }

    #[test]
    fn wide_tables_wrap_to_fit_100_columns() {
        let headers = [
            "",
            "start-up",
            "throughput",
            "mean",
            "p50",
            "p99",
            "p99.9",
            "errors",
            "pypool ÷ this: throughput",
            "p50",
            "p99",
        ];
        let row: Vec<String> = [
            "ProcessPoolExecutor",
            "337.6ms",
            "12,345/s",
            "8.12ms",
            "7.90ms",
            "11.6ms",
            "13.4ms",
            "0",
            "1.23×",
            "0.98×",
            "0.87×",
        ]
        .map(String::from)
        .to_vec();
        let out = table(&headers, &[row.clone(), row], 0);
        for line in out.lines() {
            assert!(line.chars().count() <= MAX_WIDTH, "{line:?} in\n{out}");
        }
        assert!(out.contains("ProcessPoolExecutor"), "{out}");
    }
}
