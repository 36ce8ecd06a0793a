//! `pypool call`: one worker for the user's module, one call, the result or the error.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pypool::{placeholder_index, Payload, Pool, PoolConfig};
use serde_json::{json, Map, Value};
use tokio::io::AsyncReadExt;

use crate::ui::{error_json, Failure, Ui};
use crate::{CallArgs, Global};

pub async fn run(global: &Global, args: CallArgs) -> Result<ExitCode, Failure> {
    let ui = Ui::new(global);
    let value = parse_args(args.args.as_deref()).await?;
    check_app(&args.app)?;
    let launcher = pypool::launcher("stdio")?;
    let timeout = args.timeout;
    let config = PoolConfig::new(args.app.clone())
        .name("call")
        .size(1)
        .python(&global.python)
        .call_timeout(timeout)
        .checkout_timeout(timeout);

    let spinner = ui.spinner(format!("starting a worker for {}", args.app));
    let pool = Pool::start(config, launcher).await;
    spinner.finish_and_clear();
    let pool = pool.map_err(|err| start_failure(&args.app, &global.python, err))?;

    let spinner = ui.spinner(format!("calling {}", args.command));
    let t0 = Instant::now();
    let result = match &args.session {
        Some(id) => pool.session(id.clone()).call(&args.command, value).await,
        None => pool.call(&args.command, value).await,
    };
    let elapsed = t0.elapsed();
    spinner.finish_and_clear();
    pool.shutdown(Duration::from_secs(5)).await;

    match result {
        Ok(reply) => {
            let shown = readable(&reply, &reply.value);
            if ui.json {
                println!(
                    "{}",
                    json!({"ok": true, "result": shown, "elapsed_ms": crate::measure::ms(elapsed)})
                );
            } else {
                let text = serde_json::to_string_pretty(&shown)
                    .map_err(|err| Failure::failed(err.to_string()))?;
                println!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => Err(call_failure(&args.command, &err)),
    }
}

/// Parses JSON_ARGS (`-`: from stdin); absent means null.
async fn parse_args(text: Option<&str>) -> Result<Value, Failure> {
    let text = match text {
        None => return Ok(Value::Null),
        Some("-") => {
            let mut input = String::new();
            tokio::io::stdin()
                .read_to_string(&mut input)
                .await
                .map_err(|err| {
                    Failure::usage(format!("cannot read JSON_ARGS from stdin: {err}"))
                })?;
            input
        }
        Some(text) => text.to_owned(),
    };
    serde_json::from_str(&text).map_err(|err| {
        let shown: String = text.chars().take(80).collect();
        let more = if text.chars().count() > 80 { "…" } else { "" };
        Failure::usage(format!(
            "JSON_ARGS is not valid JSON: {err}\n  got: {shown}{more}\nhint: quote it for the shell, e.g. '{{\"text\": \"hello\"}}'; strings need double quotes"
        ))
    })
}

/// A path-like APP must exist; a module name is checked by the worker.
fn check_app(app: &str) -> Result<(), Failure> {
    let path_like =
        app.ends_with(".py") || app.contains('/') || app.contains(std::path::MAIN_SEPARATOR);
    if !path_like {
        return Ok(());
    }
    let path = Path::new(app);
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if !path.exists() {
        return Err(Failure::start(format!(
            "app file `{app}` not found (looked for {})\nhint: APP is a path to a .py file or a dotted module name",
            absolute.display()
        )));
    }
    if !path.is_file() {
        return Err(Failure::start(format!(
            "app `{app}` is not a file\nhint: for a package, pass its dotted module name (e.g. mypackage.handlers)"
        )));
    }
    Ok(())
}

fn start_failure(app: &str, python: &Path, err: pypool::Error) -> Failure {
    let text = err.to_string();
    let hint = if text.contains("ModuleNotFoundError") || text.contains("No module named") {
        let cwd = std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|_| ".".into());
        let (chosen, source) = pypool::process::choose_python(python, &Default::default());
        format!("\nhint: APP must be a path to a .py file, or a module importable from the current directory ({cwd}) or PYTHONPATH; a module the app imports may be missing from the workers' interpreter, `{}` ({source}): install it there, or choose another with --python, $PYPOOL_PYTHON or an active virtualenv", chosen.display())
    } else if text.contains("registers no handlers") {
        "\nhint: decorate the functions to serve with @handler (from pypool_worker import handler)"
            .to_owned()
    } else if text.contains("interpreter") {
        "\nhint: install Python 3 or pass --python PATH; `pypool doctor` checks the setup"
            .to_owned()
    } else {
        String::new()
    };
    let json = json!({"ok": false, "error": {"type": "StartFailed", "message": text, "traceback": null, "source": "pool"}});
    Failure::start(format!(
        "cannot start a worker for app `{app}`: {text}{hint}"
    ))
    .with_json(json)
}

fn call_failure(command: &str, err: &pypool::Error) -> Failure {
    let json = json!({"ok": false, "error": error_json(err)});
    if let pypool::Error::UnknownCommand {
        known, suggestion, ..
    } = err
    {
        // A mistake on the command line, not a failed call.
        let mut message = format!("the app has no handler `{command}`");
        if let Some(suggestion) = suggestion {
            message.push_str(&format!(" (did you mean `{suggestion}`?)"));
        }
        message.push_str(&format!("; its handlers: {}", known.join(", ")));
        return Failure::usage(message).with_json(json);
    }
    let message = match err {
        pypool::Error::Handler { error, .. } => {
            let mut message = format!("`{command}` raised {}: {}", error.kind, error.message);
            if let Some(traceback) = &error.traceback {
                message.push('\n');
                message.push_str(traceback.trim_end());
            }
            message
        }
        other => format!("`{command}` failed: {other}"),
    };
    Failure::failed(message).with_json(json)
}

/// The value with every byte placeholder replaced by a readable description of the bytes.
fn readable(payload: &Payload, value: &Value) -> Value {
    if placeholder_index(value).is_some() {
        return match payload.bytes_at(value) {
            Some(bytes) => describe_bytes(bytes),
            None => value.clone(),
        };
    }
    match value {
        Value::Array(items) => Value::Array(items.iter().map(|v| readable(payload, v)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), readable(payload, v)))
                .collect::<Map<String, Value>>(),
        ),
        other => other.clone(),
    }
}

fn describe_bytes(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => json!({"bytes": bytes.len(), "utf8": text}),
        Err(_) => {
            let mut hex: String = bytes.iter().take(256).map(|b| format!("{b:02x}")).collect();
            if bytes.len() > 256 {
                hex.push('…');
            }
            json!({"bytes": bytes.len(), "hex": hex})
        }
    }
}
