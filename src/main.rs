//! The `herald` binary: everything lives in the library.

/// mimalloc: malloc and free were a fifth of herald's instructions per job
/// under glibc's allocator (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    herald::cli::main()
}
