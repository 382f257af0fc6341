//! The `herald` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    herald::alloc::limit_arenas();
    herald::cli::main()
}
