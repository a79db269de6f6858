//! `weir serve`: run the host until SIGINT or SIGTERM.
//!
//! Loads `weir.toml` (plus `WEIR_*` overrides), then hands over to [`crate::serve`]. On the
//! first signal the host drains its workers and stops; a second signal stops it at once.

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::common::{ConfigFileArg, Failure, load_config};
use super::{OutputFormat, exit};

/// Flags of `weir serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    config: ConfigFileArg,
}

/// Run the command; returns the exit code.
pub fn run(args: ServeArgs) -> u8 {
    let config = match load_config(args.config.config_file.as_deref()) {
        Ok(config) => config,
        Err(failure) => {
            crate::telemetry::init_cli();
            return failure.report(OutputFormat::Human);
        }
    };
    crate::telemetry::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return Failure::other("internal", format!("cannot start the async runtime: {e}"))
                .report(OutputFormat::Human);
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: draining (a second signal stops at once)");
            signals.cancel();
            wait_for_signal().await;
            tracing::warn!("second signal: stopping without draining");
            std::process::exit(i32::from(exit::FAILURE));
        });
        let code = match crate::serve::serve(config, shutdown).await {
            Ok(()) => exit::OK,
            Err(e) => Failure::other("serve-failed", e.to_string()).report(OutputFormat::Human),
        };
        // The exporter's flush blocks: off the executor.
        let _ = tokio::task::spawn_blocking(crate::telemetry::shutdown).await;
        code
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
