//! glibc's allocator, fitted to a worker with a few busy threads.
//!
//! glibc gives each thread that meets contention an arena of its own, up to
//! eight per core. Memory freed in one arena is reused only by that arena, so
//! with tokio's workers, lapin's I/O thread and the log thread each filling
//! and draining their own, a worker that had delivered a million jobs held
//! 51 MiB against 47 MiB with two arenas, at the same rate (docs/benchmarks.md).

/// Two arenas, unless `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES`
/// (`glibc.malloc.arena_max`) says otherwise: glibc reads those itself. Call
/// before any thread starts.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none()
        && !std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"))
    {
        // SAFETY: mallopt only sets an allocator parameter; no thread runs yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
