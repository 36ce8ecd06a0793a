//! `pypool runtime`: the embedded `pypool_worker`, and where editors and pytest can import it.

use std::process::ExitCode;

use pypool::process::runtime::{materialize_runtime, runtime_digest, FILES, PACKAGE};
use pypool::process::RUNTIME_VERSION;
use serde_json::json;

use crate::ui::{Failure, Ui};
use crate::{Global, RuntimeArgs};

pub async fn run(global: &Global, args: RuntimeArgs) -> Result<ExitCode, Failure> {
    let ui = Ui::new(global);
    let dir = tokio::task::spawn_blocking(materialize_runtime)
        .await
        .map_err(|err| Failure::failed(err.to_string()))?
        .map_err(|err| {
            Failure::failed(format!(
                "{err}\nhint: set XDG_CACHE_HOME to a writable directory, or install the runtime with `pip install ./python`"
            ))
        })?;
    if ui.json {
        println!(
            "{}",
            json!({
                "package": PACKAGE,
                "version": RUNTIME_VERSION,
                "digest": runtime_digest(),
                "path": dir,
                "files": FILES.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            })
        );
    } else if args.path {
        println!("{}", dir.display());
    } else {
        println!("{PACKAGE} {RUNTIME_VERSION} (embedded in this pypool)");
        println!("path     {}", dir.display());
        println!();
        println!(
            "Workers import it from there unless their interpreter has the same version installed."
        );
        println!("To import it elsewhere (editors, type checkers, pytest):");
        println!("  PYTHONPATH=\"$(pypool runtime --path)\" pytest");
        println!("or install it into an environment: pip install ./python (from a checkout).");
    }
    Ok(ExitCode::SUCCESS)
}
