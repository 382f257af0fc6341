//! `herald-bench profile`: where herald's time per job goes, measured on the
//! `herald run` child process over a backlog, after a warm-up.
//!
//! - `callgrind`: instructions per job, which repeat to a fraction of a percent
//!   on a machine others load (for before/after comparisons); the counters are
//!   zeroed after the warm-up and dumped at the end, so start-up is left out.
//! - `perf`: `perf record -e cpu-clock -g` attached after the warm-up.

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
}

pub async fn profile(
    broker: &BrokerUrls,
    tool: Tool,
    jobs: usize,
    warmup: usize,
    account: &str,
) -> anyhow::Result<()> {
    let session = Session::start(broker, Duration::ZERO).await?;
    let dir = workers::bench_dir()?;
    let stamp = format!("{:08x}", rand::random::<u32>());
    let out = dir.join(format!("callgrind.{stamp}"));
    let wrapper: Vec<String> = match tool {
        Tool::Callgrind => vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            format!("--callgrind-out-file={}", out.display()),
        ],
        Tool::Perf => Vec::new(),
    };
    let label = if account.is_empty() {
        "defaults".to_string()
    } else {
        format!("`{account}`")
    };
    let worker = Worker::herald(&label, account);
    let mut running = Running::start_wrapped(&session, &worker, warmup + jobs, &wrapper).await?;
    let pid = running.process().pid();
    let warm = running.wait_for(warmup).await?;
    let (before, report) = match tool {
        Tool::Callgrind => {
            control(&["-z", &pid.to_string()])?;
            (session.receiver.stats().await?.unique, None)
        }
        Tool::Perf => {
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
        }
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
