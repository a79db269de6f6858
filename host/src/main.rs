//! The `weir` binary: parses the command line and hands over to [`weir::cli`].

use std::process::ExitCode;

fn main() -> ExitCode {
    weir::cli::main()
}
