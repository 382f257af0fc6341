//! `herald-bench profile`: where herald's time per job goes, measured on the
//! `herald run` child process over a backlog, after a warm-up.
//!
//! - `callgrind`: instructions per job, which repeat to a fraction of a percent
//!   on a machine others load (for before/after comparisons); the counters are
//!   zeroed after the warm-up and dumped at the end, so start-up is left out.
//! - `perf`: `perf record -e cpu-clock -g` attached after the warm-up.
//! - `massif`: the heap at its peak, by the call sites that allocated it
//!   (`ms_print` of the peak snapshot); the warm-up is not left out.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use herald::config::BrokerUrls;

use crate::measure::{Running, Session};
use crate::workers::{self, Worker};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tool {
    Callgrind,
    Perf,
    Massif,
}

pub async fn profile(
    broker: &BrokerUrls,
    tool: Tool,
    jobs: usize,
    warmup: usize,
    account: &str,
    latency: Duration,
) -> anyhow::Result<()> {
    let session = Session::start(broker, latency).await?;
    let dir = workers::bench_dir()?;
    let stamp = format!("{:08x}", rand::random::<u32>());
    let label = label(account);
    let worker = Worker::herald(&label, account);
    if tool == Tool::Massif {
        let heap = dir.join(format!("massif.{stamp}"));
        massif(&session, &worker, warmup + jobs, &heap).await?;
        session.close().await;
        return Ok(());
    }
    let out = dir.join(format!("callgrind.{stamp}"));
    // Callgrind or perf from here on.
    let callgrind = tool == Tool::Callgrind;
    let wrapper: Vec<String> = if callgrind {
        vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            format!("--callgrind-out-file={}", out.display()),
        ]
    } else {
        Vec::new()
    };
    let mut running = Running::start_wrapped(&session, &worker, warmup + jobs, &wrapper).await?;
    let pid = running.process().pid();
    let warm = running.wait_for(warmup).await?;
    let (before, report) = if callgrind {
        control(&["-z", &pid.to_string()])?;
        (session.receiver.stats().await?.unique, None)
    } else {
        let data = dir.join(format!("perf.{stamp}.data"));
        let perf = Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-g",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting perf record")?;
        (session.receiver.stats().await?.unique, Some((perf, data)))
    };
    let stats = running.wait_for(warmup + jobs).await?;
    let after = match &report {
        None => {
            control(&["-d", &pid.to_string()])?;
            session.receiver.stats().await?.unique
        }
        Some((perf, _)) => {
            let _ = Command::new("kill")
                .args(["-INT", &perf.id().to_string()])
                .status();
            stats.unique
        }
    };
    let measured = after.saturating_sub(before);
    println!(
        "profile: herald {label}, {tool:?}, {measured} jobs measured after {} warm-up jobs",
        warm.unique
    );
    match report {
        None => {
            let dump = dump_file(&out).context("no callgrind dump")?;
            let total = total_instructions(&dump)?;
            println!(
                "  {total} instructions, {:.0} per job ({})",
                total as f64 / measured as f64,
                dump.display()
            );
            annotate(&["--inclusive=no"], &dump, measured)?;
            annotate(&["--inclusive=yes"], &dump, measured)?;
        }
        Some((mut perf, data)) => {
            perf.wait()?;
            let report = Command::new("perf")
                .args([
                    "report",
                    "--no-children",
                    "--sort",
                    "dso,symbol",
                    "--stdio",
                    "-i",
                ])
                .arg(&data)
                .output()?;
            let text = String::from_utf8_lossy(&report.stdout);
            for line in text
                .lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && l.contains('%')
                        && !l.trim_start().starts_with('|')
                        && !l.trim_start().starts_with('-')
                })
                .take(40)
            {
                println!("  {line}");
            }
            println!("  ({})", data.display());
        }
    }
    running.finish(stats).await?;
    session.close().await;
    Ok(())
}

fn label(account: &str) -> String {
    if account.is_empty() {
        "defaults".to_string()
    } else {
        format!("`{account}`")
    }
}

/// Runs herald under massif over `jobs` jobs, then prints its heap at the
/// peak by allocation site.
async fn massif(
    session: &Session,
    worker: &Worker,
    jobs: usize,
    heap: &Path,
) -> anyhow::Result<()> {
    let wrapper = [
        "valgrind".to_string(),
        "--tool=massif".into(),
        "--depth=40".into(),
        "--threshold=1.0".into(),
        format!("--massif-out-file={}", heap.display()),
    ];
    let mut running = Running::start_wrapped(session, worker, jobs, &wrapper).await?;
    let stats = running.wait_for(jobs).await?;
    running.finish(stats).await?;
    let text = std::fs::read_to_string(heap).context("no massif output")?;
    let (total, sites) = peak_sites(&text).context("no snapshot in the massif output")?;
    println!(
        "profile: herald {}, Massif, {jobs} jobs: heap at its peak {:.1} MiB ({})",
        worker.label(),
        mib(total),
        heap.display()
    );
    for (site, bytes) in sites.iter().take(25) {
        println!("  {:7.2} MiB  {site}", mib(*bytes));
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// Frames that say nothing of who allocated: the allocator, std's
/// collections and smart pointers, tokio's task machinery, inlined helpers.
/// A frame naming herald (a generic instantiated for one of its types) is
/// never plumbing.
fn is_plumbing(frame: &str) -> bool {
    const PLUMBING: &[&str] = &[
        "alloc::",
        "alloc (",
        "alloc_impl",
        "extend_with",
        "reserve<",
        "raw_vec",
        "core::",
        "std::",
        "<alloc",
        "<core",
        "<std",
        "UnknownInlinedFun",
        "realloc",
        "malloc",
        "calloc",
        "hashbrown",
        "smallvec",
        "bytes::",
        "<bytes",
        "__rust",
        "grow",
        "finish_grow",
        "do_reserve",
        "box_new",
        "new<",
        "pin<",
        "from<",
        "into<",
        "clone",
        "to_vec",
        "to_owned",
        "to_string",
        "{closure",
        "{async",
        "catch_unwind",
        "do_call",
        "call_once",
        "with_mut",
        "poll_future",
        "poll_inner",
        "tokio::runtime",
        "<tokio::runtime",
        "<tracing::instrument",
        "tokio_util::task",
        "<tokio_util::task",
        "<futures",
        "futures_util::",
        "start_thread",
        "clone (",
        "thread_start",
    ];
    !frame.contains("herald::") && PLUMBING.iter().any(|p| frame.starts_with(p))
}

/// The peak snapshot's heap, by the first frame of each allocation's stack
/// that is not plumbing (the allocation site as a reader would name it).
fn peak_sites(massif: &str) -> Option<(u64, Vec<(String, u64)>)> {
    let lines: Vec<&str> = massif.lines().collect();
    // Snapshots with a tree: `heap_tree=peak` or `detailed`; the peak if there is one.
    let mut best: Option<(bool, u64, usize)> = None;
    let mut heap = 0;
    for (i, line) in lines.iter().enumerate() {
        if let Some(b) = line.strip_prefix("mem_heap_B=") {
            heap = b.parse().unwrap_or(0);
        } else if let Some(kind) = line.strip_prefix("heap_tree=") {
            let candidate = (kind == "peak", heap, i + 1);
            if kind != "empty" && best.is_none_or(|b| (candidate.0, candidate.1) > (b.0, b.1)) {
                best = Some(candidate);
            }
        }
    }
    let (_, total, start) = best?;
    let mut sites = std::collections::HashMap::new();
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    for line in &lines[start..] {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix('n') else {
            break;
        };
        let depth = line.len() - trimmed.len();
        let (children, rest) = rest.split_once(": ")?;
        let (bytes, frame) = rest.split_once(' ')?;
        let (children, bytes): (usize, u64) = (children.parse().ok()?, bytes.parse().ok()?);
        stack.truncate(depth);
        let frame = frame.split_once(": ").map_or(frame, |(_, f)| f);
        // The root (depth 0) is the allocator's total, not a site.
        let named = stack.last().and_then(|(_, n)| n.clone()).or_else(|| {
            (depth > 0 && !is_plumbing(frame) && !frame.starts_with("in "))
                .then(|| frame.chars().take(120).collect())
        });
        if depth > 0 && (children == 0 || named.is_some()) {
            // A leaf, or the first named frame: its bytes are counted once, here.
            if stack.last().and_then(|(_, n)| n.as_ref()).is_none() {
                let site = named
                    .clone()
                    .unwrap_or_else(|| frame.chars().take(120).collect());
                *sites.entry(site).or_insert(0) += bytes;
            }
        }
        stack.push((children, named));
    }
    let mut sites: Vec<_> = sites.into_iter().collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.1));
    Some((total, sites))
}

fn control(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("callgrind_control")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running callgrind_control")?;
    anyhow::ensure!(status.success(), "callgrind_control {args:?} failed");
    Ok(())
}

/// The first dump `callgrind_control -d` wrote next to `base`.
fn dump_file(base: &Path) -> Option<PathBuf> {
    let dir = base.parent()?;
    let name = base.file_name()?.to_str()?;
    let mut dumps: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(name) && n.ends_with(".1"))
        })
        .collect();
    dumps.sort();
    dumps.pop()
}

fn total_instructions(dump: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(dump)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no totals in the callgrind dump")
}

/// The top functions, in instructions per job. The threads' entry points
/// (never returned from when the dump is taken) show every cost as their
/// own: left out of the exclusive list.
fn annotate(args: &[&str], dump: &Path, jobs: u64) -> anyhow::Result<()> {
    let out = Command::new("callgrind_annotate")
        .args(args)
        .args(["--threshold=100", "--auto=no"])
        .arg(dump)
        .output()
        .context("running callgrind_annotate")?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("  callgrind_annotate {}:", args.join(" "));
    let exclusive = args.contains(&"--inclusive=no");
    let rows = text
        .lines()
        .skip_while(|l| !l.contains("file:function"))
        .filter_map(|l| {
            let (count, rest) = l.trim_start().split_once(' ')?;
            let count: u64 = count.replace(',', "").parse().ok()?;
            let (share, name) = rest.trim_start().strip_prefix('(')?.split_once("%)")?;
            let share: f64 = share.trim().parse().ok()?;
            let name = name.trim();
            let name = name.rsplit_once(':').map_or(name, |(_, f)| f);
            Some((count, share, name.to_string()))
        })
        .filter(|(_, share, _)| !exclusive || *share < 50.0)
        .take(25);
    for (count, share, name) in rows {
        let name: String = name.chars().take(140).collect();
        println!(
            "  {:>9.0} {share:>5.1}%  {name}",
            count as f64 / jobs as f64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_summed_by_its_first_named_frame() {
        let massif = "\
snapshot=0
mem_heap_B=10
heap_tree=detailed
n1: 10 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.
 n1: 10 0x1: alloc::alloc::alloc (alloc.rs:1)
  n0: 10 0x2: lapin::buffer::Buffer::grow (buffer.rs:75)
snapshot=1
mem_heap_B=300
heap_tree=peak
n3: 300 (heap allocation functions) malloc/new/new[], --alloc-fns, etc.
 n2: 250 0x1: realloc (alloc.rs:135)
  n1: 200 0x2: reserve<alloc::alloc::Global> (library/alloc/src/raw_vec/mod.rs:673)
   n1: 200 0x3: lapin::buffer::Buffer::grow (buffer.rs:75)
    n0: 200 0x4: lapin::io_loop::IoLoop::start (io_loop.rs:228)
  n1: 50 0x5: hyper::proto::h1::io::Buffered::poll_read_from_io (io.rs:242)
   n0: 50 0x6: tokio::runtime::task::harness::Harness::poll (harness.rs:1)
 n0: 40 in 12 places, all below massif's threshold (1.00%)
 n1: 10 0x7: malloc (malloc.c:1)
  n0: 10 0x8: lapin::buffer::Buffer::grow (buffer.rs:75)
";
        let (total, sites) = peak_sites(massif).unwrap();
        assert_eq!(total, 300);
        let get = |name: &str| sites.iter().find(|(s, _)| s.starts_with(name)).map(|s| s.1);
        assert_eq!(get("lapin::buffer::Buffer::grow"), Some(210));
        assert_eq!(get("hyper::proto::h1::io::Buffered"), Some(50));
        assert_eq!(get("in 12 places"), Some(40));
        assert_eq!(sites.iter().map(|s| s.1).sum::<u64>(), 300);
        assert_eq!(sites[0].0, "lapin::buffer::Buffer::grow (buffer.rs:75)");
    }
}
