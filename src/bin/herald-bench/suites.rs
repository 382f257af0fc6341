//! The benches of issue 12, each printing a markdown table of one run:
//! throughput against the baselines, latency at a fixed rate, peak RSS, the
//! adaptive in-flight limit against fixed settings, and a profile of herald.

use std::time::Duration;

use crate::measure::{self, Run, Session};
use crate::workers::Worker;
use herald::config::BrokerUrls;

/// The workers of `throughput`, in the order they run.
pub fn throughput_workers(tuned: &str) -> Vec<Worker> {
    vec![
        Worker::herald("defaults", ""),
        Worker::Bare { prefetch: 500 },
        Worker::Node { prefetch: 200 },
        Worker::Go { prefetch: 200 },
        Worker::herald(&format!("tuned (`{}`)", tuned.replace('\n', ", ")), tuned),
    ]
}

fn mib(rss: Option<f64>) -> String {
    rss.map_or_else(|| "-".into(), |m| format!("{m:.0} MiB"))
}

/// Every worker over the same backlog of `n` jobs; ratios of herald's defaults
/// (and tuned) to each.
pub async fn throughput(
    broker: &BrokerUrls,
    n: usize,
    workers: &[Worker],
    rounds: usize,
) -> anyhow::Result<()> {
    let session = Session::start(broker, Duration::ZERO).await?;
    println!(
        "throughput: {n} jobs of ~{} bytes per worker, receiver {} (pid {}), broker {broker}",
        crate::workers::job("00000000", 0).1.len(),
        session.receiver.addr,
        session.receiver.pid()
    );
    for round in 1..=rounds {
        let mut runs = Vec::new();
        for worker in workers {
            let run = measure::backlog(&session, worker, n).await?;
            eprintln!("  {}: {:.0} jobs/s", worker.label(), run.rate());
            runs.push(run);
        }
        println!("\nround {round}\n");
        print_ratios(&runs);
    }
    session.close().await;
    Ok(())
}

fn print_ratios(runs: &[Run]) {
    let herald: Vec<&Run> = runs.iter().filter(|r| r.worker.is_herald()).collect();
    print!("| worker | jobs/s | peak RSS | extra requests |");
    for h in &herald {
        print!(" {} ÷ it |", h.worker.label());
    }
    println!();
    println!("|---|---|---|---|{}", "---|".repeat(herald.len()));
    for run in runs {
        print!(
            "| {} | {:.0} | {} | {} |",
            run.worker.label(),
            run.rate(),
            mib(run.rss_mib),
            run.extra_requests()
        );
        for h in &herald {
            if std::ptr::eq(*h, run) {
                print!(" — |");
            } else {
                print!(" {:.2} |", h.rate() / run.rate());
            }
        }
        println!();
    }
    for run in runs.iter().filter(|r| r.warnings > 0) {
        println!(
            "warning: {} logged {} WARN/ERROR lines ({})",
            run.worker.label(),
            run.warnings,
            run.log
                .as_ref()
                .map_or(String::new(), |l| l.display().to_string())
        );
    }
}

/// herald (defaults) and the bare loop at `rate` jobs/s for `seconds`, one
/// after the other, `rounds` times: publish-to-arrival latency of each, and
/// herald's minus the bare loop's per round (a p99 of one short run moves with
/// whatever else the machine does; the rounds show by how much).
pub async fn latency(
    broker: &BrokerUrls,
    rate: u32,
    seconds: u32,
    rounds: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
    let session = Session::start(broker, Duration::ZERO).await?;
    println!(
        "latency: {rate} jobs/s for {seconds} s, publish to arrival at the receiver, broker {broker}\n"
    );
    println!("| round | worker | p50 | p90 | p99 | max | jobs |");
    println!("|---|---|---|---|---|---|---|");
    let mut added = Vec::new();
    for round in 1..=rounds {
        let mut p = Vec::new();
        for worker in [
            Worker::herald("defaults", ""),
            Worker::Bare { prefetch: 500 },
        ] {
            let run = measure::fixed_rate(&session, &worker, rate, seconds, rate as usize).await?;
            let l = run.stats.latency_us.unwrap_or_default();
            println!(
                "| {round} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} |",
                worker.label(),
                l[0] as f64 / 1e3,
                l[1] as f64 / 1e3,
                l[2] as f64 / 1e3,
                l[3] as f64 / 1e3,
                run.stats.unique
            );
            p.push(l);
        }
        let ms = |q: usize| (p[0][q] as f64 - p[1][q] as f64) / 1e3;
        added.push((ms(0), ms(2)));
    }
    println!("\nherald minus bare, per round:");
    for (round, (p50, p99)) in added.iter().enumerate() {
        println!("  round {}: p50 {p50:+.2} ms, p99 {p99:+.2} ms", round + 1);
    }
    let mut p99: Vec<f64> = added.iter().map(|a| a.1).collect();
    p99.sort_by(f64::total_cmp);
    println!(
        "  p99 added: median {:+.2} ms, worst {:+.2} ms",
        p99[p99.len() / 2],
        p99[p99.len() - 1]
    );
    session.close().await;
    Ok(())
}

/// herald's peak RSS (defaults) draining a backlog of `n` jobs, sampled while it runs.
pub async fn rss(broker: &BrokerUrls, n: usize) -> anyhow::Result<()> {
    let session = Session::start(broker, Duration::ZERO).await?;
    let worker = Worker::herald("defaults", "");
    println!("rss: herald (defaults) draining a lane of {n} jobs, broker {broker}");
    let published = std::time::Instant::now();
    let mut running = measure::Running::start(&session, &worker, n).await?;
    println!(
        "  {n} jobs published in {:.1} s; worker started",
        published.elapsed().as_secs_f64()
    );
    let mut samples = Vec::new();
    let stats = loop {
        let stats = session.receiver.stats().await?;
        samples.push((stats.unique, running.process().peak_rss_mib()));
        if stats.unique >= n as u64 {
            break stats;
        }
        if let Some(status) = running.process_exited() {
            anyhow::bail!("herald exited early: {status}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let _ = &mut running;
    let run = running.finish(stats).await?;
    for (at, rss) in samples.iter().step_by((samples.len() / 10).max(1)) {
        println!("  after {at:>8} jobs: peak RSS {}", mib(*rss));
    }
    println!(
        "  drained {n} jobs at {:.0} jobs/s; peak RSS {}; {} extra requests; {} WARN/ERROR lines",
        run.rate(),
        mib(run.rss_mib),
        run.extra_requests(),
        run.warnings
    );
    session.close().await;
    Ok(())
}

/// At each vendor latency, `rounds` times: herald with each fixed in-flight
/// limit (adaptive off), then with its defaults; the defaults' share of the
/// best fixed setting of the same round, and its median over the rounds (one
/// run moves by 10% with whatever else this machine does).
pub async fn adaptive(
    broker: &BrokerUrls,
    latencies: &[Duration],
    fixed: &[u16],
    jobs: &[usize],
    rounds: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
    let session = Session::start(broker, Duration::ZERO).await?;
    for (i, latency) in latencies.iter().enumerate() {
        let n = jobs.get(i).or(jobs.last()).copied().unwrap_or(50_000);
        session.receiver.set_latency(*latency).await?;
        println!("\nvendor latency {latency:?}, {n} jobs per run\n");
        println!("| round | herald | jobs/s | extra requests | WARN/ERROR lines | peak RSS |");
        println!("|---|---|---|---|---|---|");
        let mut shares = Vec::new();
        for round in 1..=rounds {
            let mut best: f64 = 0.0;
            for c in fixed {
                let worker = Worker::herald(
                    &format!("fixed {c}"),
                    &format!("concurrency = {c}\nadaptive_concurrency = false"),
                );
                let run = measure::backlog(&session, &worker, n).await?;
                print_adaptive_row(round, &run);
                best = best.max(run.rate());
            }
            let run = measure::backlog(&session, &Worker::herald("defaults", ""), n).await?;
            print_adaptive_row(round, &run);
            shares.push(run.rate() / best);
        }
        let listed: Vec<String> = shares.iter().map(|s| format!("{s:.2}")).collect();
        shares.sort_by(f64::total_cmp);
        println!(
            "\ndefaults ÷ best fixed at {latency:?}: {} (median {:.2}, worst {:.2})",
            listed.join(", "),
            shares[shares.len() / 2],
            shares[0]
        );
    }
    session.close().await;
    Ok(())
}

fn print_adaptive_row(round: usize, run: &Run) {
    println!(
        "| {round} | {} | {:.0} | {} | {} | {} |",
        run.worker.label(),
        run.rate(),
        run.extra_requests(),
        run.warnings,
        mib(run.rss_mib)
    );
}
