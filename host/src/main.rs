//! The `weir` binary: parses the command line and hands over to [`weir::cli`].

use std::process::ExitCode;

/// mimalloc instead of the system allocator: the pipeline allocates a message's buffers on the
/// intake thread and frees them on the executor's, and with glibc's allocator that cost about
/// 4 % more CPU per message (docs/PERFORMANCE.md, seventh session).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    weir::cli::main()
}
