//! A three-node RabbitMQ 4 cluster (`scripts/ensure-rabbitmq4-cluster.sh`,
//! `make test-cluster`): two replicas keep one NetEase account within its
//! limit while the node they are connected to is `kill -9`ed mid-stream, and
//! deliver every job through the other nodes.
//!
//! Ignored by a plain `cargo test`: it needs that cluster, and it kills and
//! restarts one of its nodes. `HERALD_RMQ4_CLUSTER_PORTS` names the nodes'
//! AMQP ports (default `5691 5692 5693`, as the script); `HERALD_TEST_CLUSTER_URLS`
//! (comma-separated) gives herald another `broker.url`, e.g. only the first
//! node, with which herald cannot come back and the test fails.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Options, Process, free_port, scrape, signal, spawn_app, wait_until};
use herald::config::BrokerUrls;
use serde_json::Value;

const ACTIVE: &str = "herald_lane_active{vendor=\"netease\",account=\"default\"} 1";

fn ports() -> Vec<u16> {
    std::env::var("HERALD_RMQ4_CLUSTER_PORTS")
        .unwrap_or_else(|_| "5691 5692 5693".into())
        .split_whitespace()
        .map(|p| p.parse().expect("HERALD_RMQ4_CLUSTER_PORTS lists ports"))
        .collect()
}

fn node_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// The script's name for the node listening on `port`.
fn node_name(port: u16) -> String {
    format!("herald4-{port}@localhost")
}

/// `rabbitmqctl` against one node, inside the RabbitMQ 4 chroot.
fn rabbitmqctl(port: u16, args: &[&str]) -> String {
    let root =
        std::env::var("HERALD_RMQ4_ROOT").unwrap_or_else(|_| "/var/lib/herald/rabbitmq4".into());
    let out = Command::new("chroot")
        .arg(root)
        .args([
            "/usr/bin/env",
            "-i",
            "PATH=/usr/sbin:/usr/bin",
            "HOME=/var/lib/rabbitmq",
            "rabbitmqctl",
            "-n",
            &node_name(port),
        ])
        .args(args)
        .output()
        .expect("chroot runs");
    assert!(
        out.status.success(),
        "rabbitmqctl -n {} {args:?}: {}",
        node_name(port),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The OS pid of a node's Erlang VM.
fn beam_pid(port: u16) -> u32 {
    let out = rabbitmqctl(port, &["eval", "os:getpid()."]);
    out.trim()
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|_| panic!("os:getpid() answered {out:?}"))
}

/// Starts every stopped node of the cluster again (the killed one rejoins it),
/// when dropped: also when the test fails, so the next run finds three nodes.
struct RestartNodes;

impl Drop for RestartNodes {
    fn drop(&mut self) {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/ensure-rabbitmq4-cluster.sh"
        );
        let status = Command::new(script).status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            let message = format!("{script} could not restart the cluster: {status:?}");
            // A second panic while unwinding would abort and hide the first.
            if std::thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

/// `herald run` with its logs in `log`: JSON, at the default level, and the
/// node it connects to also when `broker.url` has only one.
fn spawn_replica(config: &Path, port: u16, log: &tempfile::NamedTempFile) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .args(["run", "--config"])
        .arg(config)
        .env("HERALD_HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info,lapin=warn,herald::broker=debug")
        .env("HERALD_LOG_FORMAT", "json")
        .stderr(log.reopen().unwrap());
    Process::spawn(&mut command)
}

/// A replica's log lines: JSON events, and anything else (a panic) as a string.
fn log_lines(log: &tempfile::NamedTempFile) -> Vec<Value> {
    std::fs::read_to_string(log.path())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| Value::from(line)))
        .collect()
}

/// The lines that name a node, in order: (message, node).
fn node_lines(lines: &[Value]) -> Vec<(String, String)> {
    lines
        .iter()
        .filter_map(|line| {
            let fields = &line["fields"];
            Some((
                fields["message"].as_str()?.to_string(),
                fields["node"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// A log line as an operator reads it: level, target, message, fields.
fn shown(line: &Value) -> String {
    if let Some(text) = line.as_str() {
        return text.to_string();
    }
    let fields = line["fields"].as_object().cloned().unwrap_or_default();
    let mut text = format!(
        "{} {}: {}",
        line["level"].as_str().unwrap_or("?"),
        line["target"].as_str().unwrap_or("?"),
        fields.get("message").and_then(Value::as_str).unwrap_or("")
    );
    for (key, value) in fields.iter().filter(|(k, _)| *k != "message") {
        text.push_str(&format!(" {key}={value}"));
    }
    text
}

fn port_of(node: &str) -> u16 {
    url::Url::parse(node).unwrap().port().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the three-node RabbitMQ 4 cluster and kills one of its nodes: make test-cluster"]
async fn two_replicas_deliver_every_job_within_the_limit_when_their_node_is_killed() {
    let ports = ports();
    for port in &ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            "no cluster node answers on 127.0.0.1:{port}: run scripts/ensure-rabbitmq4-cluster.sh"
        );
    }
    let pids: Vec<(u16, u32)> = ports.iter().map(|p| (*p, beam_pid(*p))).collect();
    let urls = match std::env::var("HERALD_TEST_CLUSTER_URLS") {
        Ok(list) => BrokerUrls::from_list(&list)
            .nodes()
            .iter()
            .map(|n| n.expose().to_string())
            .collect(),
        Err(_) => ports.iter().map(|p| node_url(*p)).collect(),
    };
    let app = spawn_app(
        "cluster",
        Options {
            start_worker: false,
            alone: true,
            broker_nodes: urls,
            ..Options::default()
        },
    )
    .await;
    // Dropped before `app`: the node is back before the test's topology is deleted.
    let _restart = RestartNodes;
    let total = 1500;
    app.publish_jobs("c", total).await;

    let config = app.config_file();
    let http_ports = [free_port(), free_port()];
    let logs = [
        tempfile::NamedTempFile::new().unwrap(),
        tempfile::NamedTempFile::new().unwrap(),
    ];
    let mut replicas: Vec<Process> = (0..2)
        .map(|i| spawn_replica(config.path(), http_ports[i], &logs[i]))
        .collect();
    wait_until("400 delivered", Duration::from_secs(60), || {
        app.sandbox.delivered_count() >= 400
    })
    .await;

    let mut active = Vec::new();
    for (i, port) in http_ports.iter().enumerate() {
        if scrape(*port).await.contains(ACTIVE) {
            active.push(i);
        }
    }
    assert_eq!(active.len(), 1, "one replica consumes the lane: {active:?}");
    let active = active[0];
    let logged = log_lines(&logs[active]);
    let before_kill = logged.len();
    let connected = node_lines(&logged);
    let (_, node) = connected
        .iter()
        .rev()
        .find(|(message, _)| message == "connected to RabbitMQ")
        .unwrap_or_else(|| panic!("the active replica logged no node: {connected:?}"));
    assert!(!node.contains("guest:guest"), "password in the log: {node}");
    let victim = port_of(node);
    let pid = pids.iter().find(|(p, _)| *p == victim).unwrap().1;

    let killed_at_ms = app.sandbox.now_ms();
    let killed = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -9 {pid} ({})", node_name(victim));

    let sandbox = app.sandbox.clone();
    wait_until(
        &format!("{total} delivered after the kill"),
        Duration::from_secs(60),
        move || sandbox.delivered_count() >= total,
    )
    .await;
    app.wait_for_distinct_jobs(total, Duration::from_secs(30))
        .await;
    let mut new_active = Vec::new();
    for (i, port) in http_ports.iter().enumerate() {
        if scrape(*port).await.contains(ACTIVE) {
            new_active.push(i);
        }
    }
    let exited: Vec<_> = replicas.iter_mut().map(|r| r.try_wait().unwrap()).collect();
    for replica in &mut replicas {
        signal(replica, "-TERM");
        let _ = replica.wait();
    }

    let stats = app.netease_stats();
    let delivered = app.delivered();
    let mut arrivals: Vec<u64> = delivered.iter().map(|m| m.received_ms).collect();
    arrivals.sort_unstable();
    // Requests herald sent before it noticed the lost connection may still
    // arrive after the kill; the failover is the longest silence around it.
    let first_after_kill = arrivals
        .iter()
        .find(|ms| **ms >= killed_at_ms)
        .expect("requests after the kill");
    let resumed_ms = arrivals
        .iter()
        .filter(|ms| **ms + 1000 >= killed_at_ms)
        .collect::<Vec<_>>()
        .windows(2)
        .max_by_key(|w| w[1] - w[0])
        .map(|w| *w[1])
        .expect("requests around the kill");
    let by_id = app.deliveries_by_id();
    let duplicates: usize = by_id.values().map(|n| n - 1).sum();
    let logged_after = log_lines(&logs[active]).split_off(before_kill);
    let after = node_lines(&logged_after);
    let reconnected = after
        .iter()
        .find(|(message, _)| message == "connected to RabbitMQ")
        .map(|(_, node)| port_of(node));
    // The CLI connects from the first node, the dead one, and goes on to the next.
    let stats_out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["dlq", "stats", "--json", "--config"])
        .arg(config.path())
        .output()
        .unwrap();
    assert!(
        stats_out.status.success(),
        "herald dlq stats with a node down: {}",
        String::from_utf8_lossy(&stats_out.stderr)
    );
    let groups: Vec<Value> = serde_json::from_slice(&stats_out.stdout).expect("dlq stats --json");
    let dead: u64 = groups.iter().filter_map(|g| g["count"].as_u64()).sum();

    eprintln!(
        "cluster: 3 nodes, 2 replicas, {total} jobs: {} delivered ({duplicates} duplicate(s)), {} blocked (416), \
         max {} in any 1 s at the vendor, {dead} dead; killed {} (the active replica's node) at {killed_at_ms} ms: \
         first request after it +{} ms, deliveries resumed +{:.2} s after the kill, on node {reconnected:?}; \
         active replica {active} before, {new_active:?} after; busiest second from {} ms; node lines after the kill: {after:?}",
        by_id.len(),
        stats.blocked,
        stats.max_in_any_second,
        node_name(victim),
        first_after_kill - killed_at_ms,
        (resumed_ms - killed_at_ms) as f64 / 1000.0,
        stats.busiest_second_ms.unwrap_or_default(),
    );
    let operator: Vec<String> = logged_after.iter().take(8).map(shown).collect();
    eprintln!(
        "cluster: the active replica's log after the kill:\n  {}",
        operator.join("\n  ")
    );
    assert!(
        exited.iter().all(Option::is_none),
        "a replica exited on its own: {exited:?}"
    );
    assert_eq!(by_id.len(), total, "every job delivered");
    assert_eq!(stats.blocked, 0, "{stats:?}");
    assert!(stats.max_in_any_second <= 100, "{stats:?}");
    assert_eq!(dead, 0, "no job dead-lettered");
    assert!(
        duplicates <= 8,
        "only jobs in flight at the kill (≤ prefetch 8) may repeat: {duplicates}"
    );
    let reconnected = reconnected.expect("the active replica connected again");
    assert_ne!(reconnected, victim, "to another node");
    assert!(
        after
            .first()
            .is_none_or(|(_, node)| port_of(node) != victim),
        "the killed node is not tried first: {after:?}"
    );
    assert_eq!(new_active.len(), 1, "one replica consumes the lane again");
}
