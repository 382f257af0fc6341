//! The `herald` command line: one binary, one subcommand per job.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::audit::Actor;
use crate::broker::{self, Publisher};
use crate::config::{Config, ReviewConfig};
use crate::dlq::{Action, Filter, Plan, Selection};
use crate::outcome::Reason;
use crate::sandbox::{self, Sandbox};
use crate::topology::{self, DlqLayout, Names, Topology};
use crate::worker::Worker;
use crate::{demo, dlq, enqueue, job, logging};

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = format!("Delivers IM notifications from RabbitMQ to {}", crate::vendor::names()),
    long_about = "herald consumes JSON jobs from RabbitMQ, enforces each vendor account's rate limit \
                  across replicas, calls the vendor, retries failures through delayed tiers and \
                  dead-letters what cannot be delivered with a reason.\n\n\
                  Start with `herald demo`, then `herald config check --config herald.toml`."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// Path of the TOML config file.
    #[arg(long, short, env = "HERALD_CONFIG", default_value = "herald.toml")]
    config: PathBuf,
}

impl ConfigArg {
    fn load(&self) -> anyhow::Result<Config> {
        Config::load(&self.config)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a worker: declare the topology, consume every account's lane, deliver.
    ///
    /// Stops on SIGTERM or Ctrl-C after draining in-flight jobs (worker.drain_timeout).
    Run(ConfigArg),
    /// Check and publish jobs: a JSON argument, --file, or stdin; NDJSON for many.
    ///
    /// Every job is checked (contract, vendor, account, field limits) before the
    /// first is published; any error publishes nothing. Publishes wait for the
    /// broker's confirm.
    Enqueue {
        #[command(flatten)]
        config: ConfigArg,
        /// Read jobs from this file (`-` for stdin).
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// One job as JSON; without it and without --file, jobs are read from stdin.
        job: Option<String>,
        /// Only check the jobs, against the contract and the vendors' field
        /// limits, and the account names of the config file when there is one;
        /// needs no broker and no secret, publishes nothing. For producers' CI.
        #[arg(long)]
        check: bool,
    },
    /// Print the JSON Schema (draft 2020-12) of the job contract v1.
    Schema,
    /// Manage the RabbitMQ topology.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Serve fake vendor APIs for tests and demos (never for production).
    Sandbox {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9900")]
        listen: SocketAddr,
        /// Every fake's apps and limits.
        #[command(flatten)]
        fakes: sandbox::Settings,
    },
    /// Review the dead-letter queue.
    #[command(subcommand)]
    Dlq(Box<DlqCommand>),
    /// Ask a running worker whether it is ready: exit 0 when its `/readyz` answers 200, else 1.
    ///
    /// Queries `http.listen` of the config (a wildcard address is asked on
    /// loopback), or --addr. For container health checks; needs no broker.
    Health {
        #[command(flatten)]
        config: ConfigArg,
        /// Address of the worker's http.listen, instead of reading the config.
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// Ask `/healthz` (the process answers) instead of `/readyz` (broker connected, lanes consuming).
        #[arg(long)]
        live: bool,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Serve the dead-letter web console on console.listen (default 127.0.0.1:8081).
    ///
    /// Needs only `[broker]` and a console token (HERALD_CONSOLE_TOKEN or
    /// console.token); refuses to start without one. Every replay, purge and
    /// edit is audited under the token's name. Stops on SIGTERM or Ctrl-C.
    Console(ConfigArg),
    /// Run a self-contained demo: sandbox, worker and sample jobs on a local RabbitMQ.
    Demo {
        /// Broker to use (one URL, or a cluster's nodes separated by commas); the demo's
        /// queues get their own prefix and are deleted afterwards.
        #[arg(
            long,
            env = "HERALD_BROKER_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        broker: String,
        /// Print the worker's log here, between the report's lines, instead of
        /// writing it to the file the report names.
        #[arg(long)]
        verbose: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TopologyCommand {
    /// Declare exchanges, lanes, retry tiers and the DLQ (idempotent).
    Apply(ConfigArg),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the config and print it resolved (file + environment), secrets redacted.
    Check(ConfigArg),
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Count dead jobs by vendor, account, reason and vendor code, with oldest and newest.
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List dead jobs (read-only: nothing is removed or reordered).
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead job: its headers and body (read-only).
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// The job id (its AMQP message_id, or else the `id` in its body).
        id: String,
    },
    /// Republish matching dead jobs to their lanes with attempts reset.
    ///
    /// Each job is confirmed by the broker before its DLQ copy is removed, so a
    /// crash mid-replay loses nothing; at worst it sends again the jobs confirmed
    /// but not yet removed (up to 64 at full speed, one at a low --rate). A run
    /// sends each job once: a copy that dies again and returns while the run
    /// still sweeps stays in the DLQ and is counted as skipped.
    /// Example: every NetEase job that died of 500 in the last hour:
    /// `herald dlq replay --vendor netease --code 500 --since 1h`
    ///
    /// Exits non-zero when the pass could not see the whole DLQ (another reader
    /// held part of it): what it replayed is reported, the rest is untouched.
    Replay {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// Jobs per second at most.
        #[arg(long)]
        rate: Option<u32>,
        /// Only show what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove dead jobs: exactly the ones it lists, never one that arrived later
    ///
    /// Without --yes it lists the matching jobs and asks (on a terminal); yes
    /// removes exactly the listed copies. To review first, or from a script,
    /// save the list, then remove exactly it:
    ///
    ///     herald dlq purge --reason invalid --save-plan plan.txt
    ///     herald dlq purge --yes --plan plan.txt
    ///
    /// A job that died after the listing, or died again, stays. With filters
    /// and --yes it lists, then removes exactly what it listed.
    ///
    /// Exits non-zero when a pass could not see the whole DLQ (another reader
    /// held part of it).
    #[command(verbatim_doc_comment)]
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// Write the listed jobs' fingerprints to FILE, for `--yes --plan FILE`.
        #[arg(long, value_name = "FILE")]
        save_plan: Option<PathBuf>,
        /// Remove exactly the copies listed in FILE (written by --save-plan); takes no filters.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with_all = ["save_plan", "id", "vendor", "account", "reason", "code", "shape", "recipient", "key", "text", "since", "until", "limit"]
        )]
        plan: Option<PathBuf>,
        /// Do not ask; required when stdin is not a terminal.
        #[arg(long)]
        yes: bool,
    },
    /// Edit one dead job and replay it: the corrected body goes to its lane.
    ///
    /// The body is checked as `herald enqueue --check` does (contract, vendor
    /// field limits, configured accounts). The new copy keeps the job's history
    /// and names the original in `x-herald-edited-from`; the original is removed
    /// only after the broker confirmed the copy. Audited.
    Edit {
        #[command(flatten)]
        config: ConfigArg,
        /// The dead job's id.
        id: String,
        /// The corrected job (JSON; `-` for stdin).
        #[arg(long, short)]
        file: PathBuf,
        /// Which dead copy, when the id has several (`dlq list --json` shows fingerprints).
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Write dead jobs as NDJSON to stdout: body, every property and header (lossless).
    ///
    /// Streams (the DLQ is never held in memory) and removes nothing:
    /// `herald dlq export --until 30d > archive.ndjson`.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Publish the jobs of an export back into the DLQ, each confirmed; audited.
    ///
    /// Every line is checked first (one bad line imports nothing); each job
    /// keeps the fingerprint it had. Importing a file twice imports its jobs twice.
    Import {
        #[command(flatten)]
        config: ConfigArg,
        /// The NDJSON file `dlq export` wrote (`-` for stdin).
        file: PathBuf,
    },
    /// Show the audit trail: every replay, purge, edit and import, who, when, which jobs.
    ///
    /// Reads the stream `<prefix>.audit` without removing anything; oldest first.
    Audit {
        #[command(flatten)]
        config: ConfigArg,
        /// Records written at or after: RFC 3339, or a duration ago (`24h`).
        #[arg(long)]
        since: Option<String>,
        /// The newest N records at most.
        #[arg(long, default_value_t = 200)]
        limit: usize,
        /// Print JSON (one array of records) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move a DLQ declared by an earlier herald to the current declaration.
    ///
    /// Earlier versions declared the DLQ without a delivery limit; on RabbitMQ
    /// 4.x every read then counts as a delivery, and the broker drops a dead job
    /// after its 20th read. The other dlq commands refuse to read such a DLQ.
    /// This moves its jobs to a holding queue, declares the DLQ again and moves
    /// them back, in order. Safe to run again after an interruption; with the
    /// DLQ already current it does nothing.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Which dead jobs a DLQ command applies to; all given filters must match.
#[derive(Debug, Args)]
struct FilterArgs {
    /// Job id.
    #[arg(long)]
    id: Option<String>,
    #[arg(long)]
    vendor: Option<String>,
    #[arg(long)]
    account: Option<String>,
    /// invalid, permanent, exhausted, expired, poison or unroutable.
    #[arg(long, value_parser = parse_reason)]
    reason: Option<Reason>,
    /// The vendor's code, e.g. 414, 500, http-503, timeout.
    #[arg(long)]
    code: Option<String>,
    /// The error's shape, as `dlq stats` shows it (ids and numbers normalised).
    #[arg(long)]
    shape: Option<String>,
    /// The recipient: `to.user` or `to.group` of the job.
    #[arg(long)]
    recipient: Option<String>,
    /// The job's `key`.
    #[arg(long)]
    key: Option<String>,
    /// Text found in the id, the error or the body (ASCII case ignored).
    #[arg(long)]
    text: Option<String>,
    /// Died at or after: RFC 3339, or a duration ago (`1h`, `30m`).
    #[arg(long)]
    since: Option<String>,
    /// Died before: RFC 3339, or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// At most this many jobs.
    #[arg(long)]
    limit: Option<usize>,
}

fn parse_reason(s: &str) -> Result<Reason, String> {
    Reason::parse(s).ok_or_else(|| {
        let all: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        format!("unknown reason `{s}`; one of {}", all.join(", "))
    })
}

impl FilterArgs {
    fn select(&self) -> anyhow::Result<Selection> {
        Ok(Selection::Matching {
            filter: self.build()?,
            limit: self.limit,
        })
    }

    fn build(&self) -> anyhow::Result<Filter> {
        let now = chrono::Utc::now();
        let time = |t: &Option<String>| t.as_deref().map(|t| dlq::parse_time(t, now)).transpose();
        Ok(Filter {
            id: self.id.clone(),
            vendor: self.vendor.clone(),
            account: self.account.clone(),
            reason: self.reason,
            code: self.code.clone(),
            shape: self.shape.clone(),
            recipient: self.recipient.clone(),
            key: self.key.clone(),
            text: self.text.clone(),
            since: time(&self.since).map_err(anyhow::Error::msg)?,
            until: time(&self.until).map_err(anyhow::Error::msg)?,
        })
    }
}

/// Parses the command line, runs the command, and maps errors to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The worker traces its jobs; the config is read again (and its errors reported) by `run`.
    let telemetry = match &cli.command {
        Command::Run(config) => Some(config.load().map(|c| c.telemetry).unwrap_or_default()),
        _ => None,
    };
    // The demo's report reads alone: the worker it runs logs to a file, unless --verbose.
    let demo_log = matches!(cli.command, Command::Demo { verbose: false, .. }).then(demo::log_path);
    let sink = match demo_log.as_deref().map(std::fs::File::create) {
        None => logging::Sink::Stderr,
        Some(Ok(file)) => logging::Sink::File(file),
        Some(Err(e)) => {
            let path = demo_log.as_deref().unwrap_or(Path::new("")).display();
            eprintln!(
                "error: cannot create the demo's log file {path}: {e} (or run with --verbose)"
            );
            return ExitCode::FAILURE;
        }
    };
    let mut logs = logging::init_to(telemetry.as_ref(), sink);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, demo_log)) {
        Ok(code) => code,
        Err(e) => {
            // The error reads last, after the log lines that led to it.
            logs.flush();
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, demo_log: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(config) => {
            let config = config.load()?;
            let shutdown = shutdown_on_signal();
            let worker = Worker::new(config)?;
            worker.serve_http(shutdown.clone()).await?;
            worker.run(shutdown).await?;
        }
        Command::Enqueue {
            config,
            file,
            job,
            check: true,
        } => {
            return check_command(&config.config, &read_jobs(file.as_deref(), job)?);
        }
        Command::Enqueue {
            config, file, job, ..
        } => {
            let input = read_jobs(file.as_deref(), job)?;
            return enqueue_command(&config.load()?, &input).await;
        }
        Command::Schema => {
            println!("{}", serde_json::to_string_pretty(&job::schema())?);
        }
        Command::Topology(TopologyCommand::Apply(config)) => {
            let config = config.load()?;
            let conn = broker::connect(&config.broker.url, "herald topology").await?;
            let topology = Topology::from_config(&config);
            match topology.declare(&conn).await? {
                DlqLayout::Legacy => {
                    eprintln!("warning: {}", topology::legacy_dlq_error(&topology.names))
                }
                DlqLayout::OtherRetention => eprintln!(
                    "warning: {}",
                    topology::other_retention_warning(&topology.names)
                ),
                DlqLayout::Current => {}
            }
            println!(
                "topology declared on {} with prefix `{}`: {} lane(s), {} retry tier(s), DLQ {}",
                config.broker.url,
                config.broker.prefix,
                topology.lanes.len(),
                topology.tiers.len(),
                topology.names.dlq()
            );
            let _ = conn.close(200, "done".into()).await;
        }
        Command::Config(ConfigCommand::Check(config)) => {
            let loaded = config.load()?;
            print!("{}", loaded.redacted_toml());
            eprintln!("config ok: {} account(s)", loaded.accounts.len());
        }
        Command::Sandbox { listen, fakes } => {
            let shutdown = shutdown_on_signal();
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let sandbox = Sandbox::new(fakes);
            info!(
                addr = %listener.local_addr()?,
                "sandbox serving: {}, control at /_sandbox",
                sandbox.served_at()
            );
            sandbox.serve(listener, shutdown).await?;
        }
        Command::Dlq(command) => return dlq_command(*command).await,
        Command::Console(config) => {
            let config = ReviewConfig::load(&config.config)?;
            crate::console::run(config, shutdown_on_signal()).await?;
        }
        Command::Health {
            config,
            addr,
            live,
            timeout,
        } => {
            let addr = match addr {
                Some(addr) => addr,
                None => config.load()?.http.listen,
            };
            let route = if live {
                &crate::http::HEALTHZ
            } else {
                &crate::http::READYZ
            };
            return Ok(match crate::http::probe(addr, route, timeout).await {
                Ok(body) => {
                    println!("{}", body.trim_end());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("not {}: {e:#}", if live { "alive" } else { "ready" });
                    ExitCode::FAILURE
                }
            });
        }
        Command::Demo { broker, .. } => demo::run(&broker, demo_log.as_deref()).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn dlq_command(command: DlqCommand) -> anyhow::Result<ExitCode> {
    let config = match &command {
        DlqCommand::Stats { config, .. }
        | DlqCommand::List { config, .. }
        | DlqCommand::Show { config, .. }
        | DlqCommand::Replay { config, .. }
        | DlqCommand::Purge { config, .. }
        | DlqCommand::Audit { config, .. }
        | DlqCommand::Edit { config, .. }
        | DlqCommand::Export { config, .. }
        | DlqCommand::Import { config, .. }
        | DlqCommand::Migrate { config } => ReviewConfig::load(&config.config)?,
    };
    let conn = broker::connect(&config.broker.url, "herald dlq").await?;
    let names = Names::new(&config.broker.prefix);
    let actor = Actor::cli();
    if !matches!(
        command,
        DlqCommand::Migrate { .. } | DlqCommand::Audit { .. }
    ) && topology::dlq_layout(&conn, &names, config.dlq.retention()).await?
        == DlqLayout::OtherRetention
    {
        eprintln!("warning: {}", topology::other_retention_warning(&names));
    }
    let mut code = ExitCode::SUCCESS;
    match command {
        DlqCommand::Migrate { .. } => {
            let migrated = crate::migrate::migrate(&conn, &names, config.dlq.retention()).await?;
            if migrated.was_legacy || migrated.moved_back > 0 {
                println!(
                    "DLQ `{}` migrated: {} dead job(s) moved out, {} moved back",
                    names.dlq(),
                    migrated.moved_out,
                    migrated.moved_back
                );
            } else {
                println!("DLQ `{}` already has the current declaration", names.dlq());
            }
        }
        DlqCommand::Audit {
            since, limit, json, ..
        } => {
            let since = since
                .as_deref()
                .map(|t| dlq::parse_time(t, chrono::Utc::now()))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let records = crate::audit::read(&conn, &names, since, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else {
                print!("{}", crate::audit::table(&records));
            }
        }
        DlqCommand::Edit {
            id,
            file,
            fingerprint,
            ..
        } => {
            let body = read_jobs(Some(&file), None)?;
            let fingerprint = match fingerprint {
                Some(f) => f,
                None => only_copy(&conn, &names, &id, &actor).await?,
            };
            let publisher = Publisher::open(&conn, config.broker.confirm_timeout).await?;
            let edited = dlq::edit_and_replay(
                &conn,
                &names,
                &publisher,
                &actor,
                &config.rules,
                &fingerprint,
                &body,
            )
            .await;
            publisher.close().await;
            let edited = edited?;
            println!(
                "edited job `{}` sent to lane {} (confirmed); dead copy {} removed",
                edited.id, edited.routing_key, edited.original.fingerprint
            );
        }
        DlqCommand::Export { filter, .. } => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let (written, coverage) =
                dlq::export(&conn, &names, &filter.build()?, &mut out).await?;
            eprintln!("exported {written} dead job(s)");
            if warn_if_partial(coverage.warning()) {
                code = ExitCode::FAILURE;
            }
        }
        DlqCommand::Import { file, .. } => {
            let input = read_jobs(Some(&file), None)?;
            let publisher = Publisher::open(&conn, config.broker.confirm_timeout).await?;
            let imported = dlq::import(&conn, &names, &publisher, &actor, &input).await;
            publisher.close().await;
            println!(
                "imported {} dead job(s) into {}, confirmed",
                imported?,
                names.dlq()
            );
        }
        DlqCommand::Stats { json, .. } => {
            let started = std::time::Instant::now();
            let (stats, coverage) = dlq::stats(&conn, &names).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats.groups())?);
            } else {
                print!("{}", stats.table());
                eprintln!("read in {:.2} s", started.elapsed().as_secs_f64());
            }
            warn_if_partial(coverage.warning());
        }
        DlqCommand::List { filter, json, .. } => {
            let swept = dlq::sweep(&conn, &names, filter.select()?, Action::DryRun, &actor).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&swept.jobs)?);
            } else {
                print!("{}", dlq::list_table(&swept.jobs));
            }
            warn_if_partial(swept.warning());
        }
        DlqCommand::Show { id, .. } => {
            let mut reader = dlq::Reader::open(&conn, &names).await?;
            let mut found = 0;
            while let Some(delivery) = reader.next().await {
                if crate::envelope::job_id(&delivery.properties, &delivery.data).as_deref()
                    == Some(id.as_str())
                {
                    found += 1;
                    print!("{}", dlq::describe(&delivery));
                }
            }
            let coverage = reader.coverage();
            reader.close(0).await;
            if found == 0 {
                eprintln!("no dead job with id `{id}`");
                code = ExitCode::FAILURE;
            }
            warn_if_partial(coverage.warning());
        }
        DlqCommand::Replay {
            filter,
            rate,
            dry_run,
            ..
        } => {
            let selection = filter.select()?;
            if dry_run {
                let swept = dlq::sweep(&conn, &names, selection, Action::DryRun, &actor).await?;
                print!("{}", dlq::list_table(&swept.jobs));
                println!("dry run: {} job(s) would be replayed", swept.jobs.len());
                warn_if_partial(swept.warning());
            } else {
                let publisher = Publisher::open(&conn, config.broker.confirm_timeout).await?;
                let swept = dlq::sweep(
                    &conn,
                    &names,
                    selection,
                    Action::Replay {
                        publisher: &publisher,
                        rate,
                    },
                    &actor,
                )
                .await;
                publisher.close().await;
                let swept = swept?;
                print!("{}", swept.stats.table());
                println!(
                    "replayed {} job(s) to their lanes, attempts reset",
                    swept.jobs.len()
                );
                if swept.skipped > 0 {
                    println!(
                        "skipped {} dead copy(ies) of jobs this run had replayed already; they stay in the DLQ",
                        swept.skipped
                    );
                }
                if warn_if_partial(swept.warning()) {
                    code = ExitCode::FAILURE;
                }
            }
        }
        DlqCommand::Purge {
            filter,
            save_plan,
            plan,
            yes,
            ..
        } => {
            let selection = match &plan {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read the plan {}", path.display()))?;
                    Selection::Planned(
                        Plan::parse(&text)
                            .map_err(|e| anyhow::anyhow!("plan {}: {e}", path.display()))?,
                    )
                }
                None => filter.select()?,
            };
            // A plan confirmed with --yes is the list already; anything else is listed first,
            // and only the listed copies are then removed.
            let selection = if plan.is_some() && yes {
                selection
            } else {
                match preview_purge(&conn, &names, selection, save_plan.as_deref(), yes, &actor)
                    .await?
                {
                    Preview::Confirmed(listed, partial) => {
                        if partial {
                            code = ExitCode::FAILURE;
                        }
                        listed
                    }
                    Preview::Stop(exit) => {
                        let _ = conn.close(200, "done".into()).await;
                        return Ok(exit);
                    }
                }
            };
            let planned = match &selection {
                Selection::Planned(plan) => plan.len(),
                Selection::Matching { .. } => 0,
            };
            let swept = dlq::sweep(&conn, &names, selection, Action::Purge, &actor).await?;
            print!("{}", swept.stats.table());
            println!("removed {} dead job(s)", swept.jobs.len());
            if swept.unfound > 0 {
                println!(
                    "{} of the {planned} listed job(s) were not in the DLQ (removed, replayed or dead again since the listing); nothing else was removed",
                    swept.unfound
                );
            }
            if warn_if_partial(swept.warning()) {
                code = ExitCode::FAILURE;
            }
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(code)
}

/// The fingerprint of the one dead copy of job `id`; an error listing them when there are several.
async fn only_copy(
    conn: &lapin::Connection,
    names: &Names,
    id: &str,
    actor: &Actor,
) -> anyhow::Result<String> {
    let selection = Selection::Matching {
        filter: Filter {
            id: Some(id.to_string()),
            ..Filter::default()
        },
        limit: None,
    };
    let found = dlq::sweep(conn, names, selection, Action::DryRun, actor).await?;
    match found.jobs.as_slice() {
        [] => anyhow::bail!("no dead job with id `{id}`; nothing was changed"),
        [one] => Ok(one.fingerprint.clone()),
        many => {
            let list: Vec<&str> = many.iter().map(|j| j.fingerprint.as_str()).collect();
            anyhow::bail!(
                "job `{id}` has {} dead copies; name one with --fingerprint: {}",
                many.len(),
                list.join(", ")
            )
        }
    }
}

/// How a purge preview ended.
#[allow(clippy::large_enum_variant)]
enum Preview {
    /// Remove exactly these listed copies; `true` if the listing saw only part of the DLQ.
    Confirmed(Selection, bool),
    /// Remove nothing, and exit so.
    Stop(ExitCode),
}

/// Lists what a purge would remove, saves the list if asked, and gets it
/// confirmed: a confirmed plan holds exactly the listed copies. Saving a plan
/// without --yes is a review step: nothing is asked or removed.
async fn preview_purge(
    conn: &lapin::Connection,
    names: &Names,
    selection: Selection,
    save_plan: Option<&Path>,
    yes: bool,
    actor: &Actor,
) -> anyhow::Result<Preview> {
    let preview = dlq::sweep(conn, names, selection, Action::DryRun, actor).await?;
    print!("{}", dlq::list_table(&preview.jobs));
    let partial = warn_if_partial(preview.warning());
    if let Some(path) = save_plan {
        let text = Plan::render(&preview.jobs, &names.dlq(), chrono::Utc::now());
        std::fs::write(path, text)
            .with_context(|| format!("cannot write the plan {}", path.display()))?;
        println!(
            "plan: {} job(s) written to {}; `herald dlq purge --yes --plan {}` removes exactly these",
            preview.jobs.len(),
            path.display(),
            path.display()
        );
    }
    if preview.jobs.is_empty() {
        println!("nothing to purge");
        return Ok(Preview::Stop(if partial {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }));
    }
    if save_plan.is_some() && !yes {
        println!("nothing removed");
        return Ok(Preview::Stop(ExitCode::SUCCESS));
    }
    let n = preview.jobs.len();
    if !yes && !confirm(&format!("remove exactly these {n} dead job(s)? [y/N] "))? {
        println!("nothing removed");
        return Ok(Preview::Stop(ExitCode::FAILURE));
    }
    Ok(Preview::Confirmed(
        Selection::Planned(Plan::of(&preview.jobs)),
        partial,
    ))
}

/// Prints a partial pass's warning; true if there was one.
fn warn_if_partial(warning: Option<String>) -> bool {
    warning.map(|w| eprintln!("{w}")).is_some()
}

/// Asks on the terminal; refuses when stdin is not one (scripts must pass --yes).
fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "stdin is not a terminal, nothing removed: rerun with --yes, or review first with --save-plan FILE and remove exactly that list with --yes --plan FILE"
        );
    }
    print!("{question}");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// The jobs given as an argument, a file or on stdin.
fn read_jobs(file: Option<&Path>, job: Option<String>) -> anyhow::Result<Vec<u8>> {
    Ok(match (job, file) {
        (Some(_), Some(_)) => anyhow::bail!("give a job as an argument or --file, not both"),
        (Some(job), None) => job.into_bytes(),
        (None, Some(path)) if path != Path::new("-") => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        (None, _) => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read stdin")?;
            buf
        }
    })
}

/// `herald enqueue --check`: every job checked and reported, nothing published.
fn check_command(config_path: &Path, input: &[u8]) -> anyhow::Result<ExitCode> {
    let rules = match std::fs::read_to_string(config_path) {
        Ok(text) => enqueue::Rules::from_config_text(&text)
            .with_context(|| format!("in {}", config_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "no config file at {}: account names are not checked",
                config_path.display()
            );
            enqueue::Rules::contract_only()
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", config_path.display())),
    };
    match enqueue::check_all_against(input, &rules) {
        Ok(checked) => {
            for c in &checked {
                println!("{}", c.job.id);
            }
            eprintln!("{} job(s) valid; nothing was published", checked.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("invalid: {e}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn enqueue_command(config: &Config, input: &[u8]) -> anyhow::Result<ExitCode> {
    let checked = match enqueue::check_all(input, config) {
        Ok(checked) => checked,
        Err(errors) => {
            for e in &errors {
                eprintln!("invalid: {e}");
            }
            eprintln!("nothing was published");
            return Ok(ExitCode::FAILURE);
        }
    };
    let conn = broker::connect(&config.broker.url, "herald enqueue").await?;
    let publisher = Publisher::open(&conn, config.broker.confirm_timeout).await?;
    let published =
        enqueue::publish(&publisher, &Names::new(&config.broker.prefix), &checked).await;
    publisher.close().await;
    published?;
    let _ = conn.close(200, "done".into()).await;
    eprintln!(
        "published {} job(s), confirmed by the broker",
        checked.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => info!("Ctrl-C: shutting down"),
                _ = term.recv() => info!("SIGTERM: shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            info!("Ctrl-C: shutting down");
        }
        cancel.cancel();
    });
    token
}
