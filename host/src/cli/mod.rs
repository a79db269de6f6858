//! The `weir` command line: argument parsing and dispatch to one module per command.
//!
//! Owns exit codes and how results are printed. Each command lives in its own module and talks
//! to the library through its public API only.

mod binding;
mod common;
mod deploy;
mod dev;
mod handler_test;
mod migrate;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit codes the `weir` binary promises to scripts.
pub mod exit {
    /// Success (for `handler test`: the handler returned ok).
    pub const OK: u8 = 0;
    /// The handler returned an error (retryable or permanent).
    pub const HANDLER_ERROR: u8 = 1;
    /// Bad command-line usage (clap's convention), or binding settings that do not validate
    /// (`handler deploy`).
    pub const USAGE: u8 = 2;
    /// The handler trapped or hit a sandbox limit (deadline, memory, stack, a refused effect).
    pub const TRAP_OR_LIMIT: u8 = 3;
    /// The file is not a valid Weir handler component.
    pub const INVALID_COMPONENT: u8 = 4;
    /// Anything else went wrong (unreadable file, invalid configuration, store unreachable, …).
    pub const FAILURE: u8 = 5;
}

/// Weir runs message handlers, compiled to WebAssembly components, against Kafka.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process")]
enum Command {
    /// Work with handler components.
    #[command(subcommand)]
    Handler(HandlerCommand),
    /// Work with bindings (a handler subscribed to topics).
    #[command(subcommand)]
    Binding(BindingCommand),
    /// Apply the store's pending schema migrations.
    ///
    /// Exit code 0 when the schema is current, 5 when the store cannot be reached or a
    /// migration fails.
    Migrate(migrate::MigrateArgs),
    /// Run the host: every binding in the store, the outbox relay, and `/health` on
    /// `server.listen`, until SIGINT or SIGTERM (which drain; a second signal stops at once).
    Serve(serve::ServeArgs),
    /// Run the whole host on this machine with nothing installed: an in-process mock Kafka
    /// cluster, SQLite under `.weir/`, the example `orders` handler deployed. `--demo` adds
    /// sample traffic and a running summary.
    Dev(dev::DevArgs),
}

#[derive(Debug, Subcommand)]
enum HandlerCommand {
    /// Run one message through a handler component in the sandbox and show what it did.
    ///
    /// Nothing is sent anywhere: emits and state writes are printed, not applied. Exit code 0
    /// when the handler returned ok, 1 on a handler error, 3 on a trap or sandbox limit, 4 when
    /// the file is not a valid Weir handler.
    Test(handler_test::TestArgs),
    /// Upload a handler component, make it the active version, and bind it to topics.
    ///
    /// Checks everything before writing anything: exit code 2 when a binding setting is
    /// invalid, 4 when the file is not a valid Weir handler, 5 when the store fails. Uploading
    /// the same bytes again keeps the version; the binding is replaced (its revision grows).
    Deploy(deploy::DeployArgs),
}

#[derive(Debug, Subcommand)]
enum BindingCommand {
    /// List the stored bindings: id, tenant, handler, topics, revision.
    List(binding::ListArgs),
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// For people.
    #[default]
    Human,
    /// One JSON document, for tools.
    Json,
}

/// Parse the command line, run the command, and return its exit code.
pub fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Handler(HandlerCommand::Test(args)) => handler_test::run(args),
        Command::Handler(HandlerCommand::Deploy(args)) => deploy::run(args),
        Command::Binding(BindingCommand::List(args)) => binding::list(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Dev(args) => dev::run(args),
    };
    ExitCode::from(code)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
