//! `weir migrate`: bring the configured store's schema up to date.
//!
//! Opens the store named by `[store]` (or `WEIR_STORE__URL`), applies the migrations it lacks,
//! and says so. Exit code 0, or 5 when the store cannot be reached or a migration fails. The
//! migrations themselves are the store's.

use clap::Args;
use serde_json::json;

use super::common::{ConfigFileArg, Failure, async_runtime, load_config};
use super::{OutputFormat, exit};

/// Flags of `weir migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    config: ConfigFileArg,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// Run the command; returns the exit code.
pub fn run(args: MigrateArgs) -> u8 {
    match execute(&args) {
        Ok(url) => {
            match args.output {
                OutputFormat::Human => {
                    println!("migrated  {url}: every migration is applied, the schema is current")
                }
                OutputFormat::Json => println!("{}", json!({"outcome": "migrated", "store": url})),
            }
            exit::OK
        }
        Err(failure) => failure.report(args.output),
    }
}

/// Migrate; the store's URL without its password.
fn execute(args: &MigrateArgs) -> Result<String, Failure> {
    let config = load_config(args.config.config_file.as_deref())?;
    let store_config = &config.store;
    async_runtime()?.block_on(async {
        let store = store_config
            .open()
            .await
            .map_err(|e| Failure::store(store_config, "connecting", e))?;
        let migrated = store.migrate().await;
        store.close().await;
        migrated.map_err(|e| Failure::store(store_config, "migrating", e))?;
        Ok(store_config.redacted_url())
    })
}
