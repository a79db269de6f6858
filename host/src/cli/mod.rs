//! The `weir` command line: argument parsing and dispatch to one module per command.
//!
//! Owns exit codes and how results are printed. Each command lives in its own module and talks
//! to the library through its public API only — or, for the control-plane commands (tenants,
//! tokens, handlers, bindings, the DLQ, produce), to a server through the admin API
//! ([`api`]).

mod api;
mod binding;
mod common;
mod deploy;
mod dev;
mod dlq;
mod handler;
mod handler_test;
mod migrate;
mod produce;
mod serve;
mod tenant;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit codes the `weir` binary promises to scripts.
pub mod exit {
    /// Success (for `handler test`: the handler returned ok).
    pub const OK: u8 = 0;
    /// The handler returned an error (retryable or permanent).
    pub const HANDLER_ERROR: u8 = 1;
    /// Bad command-line usage (clap's convention), binding settings that do not validate
    /// (`handler deploy`), or input the admin API refused (400, 413, 422; the field is named).
    pub const USAGE: u8 = 2;
    /// The handler trapped or hit a sandbox limit (deadline, memory, stack, a refused effect).
    pub const TRAP_OR_LIMIT: u8 = 3;
    /// The file is not a valid Weir handler component (locally, or as the admin API says:
    /// `empty`, `not-wasm`, `core-module`, `invalid-component`, `unknown-imports`,
    /// `wrong-world`).
    pub const INVALID_COMPONENT: u8 = 4;
    /// Anything else went wrong (unreadable file, invalid configuration, store unreachable,
    /// server unreachable or failing with a 5xx, …).
    pub const FAILURE: u8 = 5;
    /// The admin API refused the caller: no token, a wrong, revoked or expired one (401), or
    /// one not allowed to do this (403: an admin route with a tenant token, a quota, a topic
    /// not among the tenant's bindings).
    pub const REFUSED: u8 = 6;
    /// The admin API has no such object (404): tenant, handler, version, binding, DLQ entry,
    /// message. Another tenant's objects answer this too.
    pub const NOT_FOUND: u8 = 7;
    /// The change conflicts with what is there (409): the object exists, is in use, or is not
    /// in a state that allows it.
    pub const CONFLICT: u8 = 8;
}

/// What `weir --help` says about the exit codes and servers.
const AFTER_HELP: &str = "\
Commands that talk to a server (tenant, token, handler list|show|activate|rollback|delete|deploy,
binding, dlq, produce, message) call its admin API: --server or WEIR_SERVER (default
http://127.0.0.1:8080, where `weir dev` serves it), with --token or WEIR_TOKEN. `handler deploy`
and `binding list` go straight to a store instead with --config-file, or when WEIR_STORE__URL
is set or ./weir.toml exists (and neither --server nor WEIR_SERVER is given).

Exit codes:
  0  ok
  1  the handler returned an error (handler test)
  2  usage, or input refused (an invalid setting, or 400/422 from the API; the field is named)
  3  the handler trapped or hit a sandbox limit (handler test)
  4  not a valid Weir handler component
  5  other failure: store or server unreachable, a 5xx answer, unreadable file, bad configuration
  6  refused: no token, a wrong one, or not allowed (401/403)
  7  not found (404)
  8  conflict (409): exists, in use, or not in a state that allows it";

/// Weir runs message handlers, compiled to WebAssembly components, against Kafka.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about, propagate_version = true, after_help = AFTER_HELP)]
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
    Binding(binding::BindingCommand),
    /// Work with tenants (admin token).
    #[command(subcommand)]
    Tenant(tenant::TenantCommand),
    /// Work with a tenant's API tokens (admin token).
    #[command(subcommand)]
    Token(tenant::TokenCommand),
    /// Work with dead-lettered messages: list, show, replay, discard.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Publish messages to a topic through the admin API (accepted at once into the outbox;
    /// the relay publishes them, even if Kafka is down right now).
    Produce(produce::ProduceArgs),
    /// Follow a published message.
    #[command(subcommand)]
    Message(MessageCommand),
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
    /// Through the admin API (the default; see `weir --help` for the server): the binding's
    /// settings are checked, the version uploaded and, unless --no-activate, activated; with
    /// --topic the binding is created, or replaced when it exists. Straight into a store
    /// instead with --config-file, or when WEIR_STORE__URL is set or ./weir.toml exists (and
    /// neither --server nor WEIR_SERVER is given): everything is checked before anything is
    /// written, and --tenant and --topic are required.
    ///
    /// Exit code 2 when a binding setting is invalid, 4 when the file is not a valid Weir
    /// handler, 5 when the store or server fails (6, 7, 8: see `weir --help`). Uploading the
    /// same bytes again keeps the version; the binding is replaced (its revision grows):
    /// settings not given take their defaults again.
    Deploy(deploy::DeployArgs),
    /// List the tenant's handlers: active and latest version, versions, bytes.
    List(handler::ListArgs),
    /// Show a handler and its versions.
    Show(handler::NameArgs),
    /// Activate a version: every host runs it from its next message on (a hot swap).
    Activate(handler::ActivateArgs),
    /// Roll back: activate the highest version below the active one (8 when there is none).
    Rollback(handler::NameArgs),
    /// Delete a handler and all its versions; refused (8) while a binding runs it.
    Delete(handler::NameArgs),
}

#[derive(Debug, Subcommand)]
enum MessageCommand {
    /// Where a published message is: pending, sent or error.
    Status(produce::StatusArgs),
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// For people (a table, or a few aligned lines).
    #[default]
    #[value(alias = "table")]
    Human,
    /// One JSON document, for tools.
    Json,
}

/// Parse the command line, run the command, and return its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The host sets up its log from its configuration; every other command logs warnings.
    if !matches!(cli.command, Command::Serve(_)) {
        crate::telemetry::init_cli();
    }
    let code = match cli.command {
        Command::Handler(HandlerCommand::Test(args)) => handler_test::run(args),
        Command::Handler(HandlerCommand::Deploy(args)) => deploy::run(args),
        Command::Handler(HandlerCommand::List(args)) => handler::list(args),
        Command::Handler(HandlerCommand::Show(args)) => handler::show(args),
        Command::Handler(HandlerCommand::Activate(args)) => handler::activate(args),
        Command::Handler(HandlerCommand::Rollback(args)) => handler::rollback(args),
        Command::Handler(HandlerCommand::Delete(args)) => handler::delete(args),
        Command::Binding(command) => binding::run(command),
        Command::Tenant(command) => tenant::run(command),
        Command::Token(command) => tenant::run_token(command),
        Command::Dlq(command) => dlq::run(command),
        Command::Produce(args) => produce::produce(args),
        Command::Message(MessageCommand::Status(args)) => produce::status(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Dev(args) => dev::run(args),
    };
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn table_is_an_alias_of_human() {
        let cli = Cli::try_parse_from(["weir", "dlq", "list", "--output", "table"]).unwrap();
        let Command::Dlq(dlq::DlqCommand::List(args)) = cli.command else {
            panic!("parsed as {cli:?}");
        };
        assert_eq!(args.api.output, OutputFormat::Human);
    }
}
