//! The producer examples (`examples/producers/<lang>/run`), each run as a user
//! would run it, against the real broker and an in-process worker.
//!
//! Every example gets NDJSON with two deliverable jobs and one for an account
//! no lane has: it prints the three ids, the sandbox receives the two, and the
//! third reaches the DLQ through the exchange's alternate exchange, carrying the
//! AMQP properties the contract asks for. Then each must fail loudly when a
//! job is returned (an exchange with no alternate exchange) and when the
//! exchange does not exist. A missing toolchain fails the test with the setup
//! command, unless `HERALD_SKIP_PRODUCERS=1`.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Options, spawn_app};
use herald::dlq;
use herald::outcome::Reason;
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::types::FieldTable;
use serde_json::Value;

/// Each example and a probe that succeeds once `make producers-setup` has run.
const EXAMPLES: [(&str, &str); 6] = [
    ("python", "python3 -c 'import pika, jsonschema'"),
    (
        "node",
        "node -e 'require(\"amqplib\"); require(\"ajv/dist/2020\")'",
    ),
    (
        "go",
        "go version && test -d /usr/share/gocode/src/github.com/rabbitmq/amqp091-go",
    ),
    ("ruby", "ruby -e 'require \"bunny\"'"),
    (
        "php",
        "php -r 'require file_exists(\"vendor/autoload.php\") ? \"vendor/autoload.php\" : \"PhpAmqpLib/autoload.php\";'",
    ),
    (
        "java",
        "javac -version && test -r /usr/share/java/amqp-client.jar && test -r /usr/share/java/jackson-databind.jar",
    ),
];

/// Generous: the first Go build and the Java source launcher compile on a shared 2-core machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn example_dir(lang: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/producers")
        .join(lang)
}

/// The examples whose toolchain or library is missing, with what the probe said.
fn missing_toolchains() -> Vec<String> {
    EXAMPLES
        .iter()
        .filter_map(|(lang, probe)| {
            let out = Command::new("sh")
                .args(["-c", probe])
                .current_dir(example_dir(lang))
                .output()
                .ok()?;
            (!out.status.success()).then(|| {
                format!(
                    "{lang}: `{probe}` failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            })
        })
        .collect()
}

/// Runs an example's `run` with `stdin`, killing it after [`RUN_TIMEOUT`].
fn run_example(lang: &str, stdin: &str, env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(example_dir(lang).join("run"))
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{lang}/run starts: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let deadline = Instant::now() + RUN_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn describe(lang: &str, out: &Output) -> String {
    format!(
        "{lang}/run exited with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Runs {
    published: Output,
    returned: Output,
    no_exchange: Output,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_producer_example_publishes_confirmed_jobs_and_fails_loudly_when_the_broker_cannot_take_them()
 {
    let missing = missing_toolchains();
    if !missing.is_empty() {
        if std::env::var("HERALD_SKIP_PRODUCERS").as_deref() == Ok("1") {
            eprintln!("HERALD_SKIP_PRODUCERS=1: skipping\n{}", missing.join("\n"));
            return;
        }
        panic!(
            "the producer examples need toolchains and libraries that are missing; run `make producers-setup`\n{}",
            missing.join("\n")
        );
    }

    let app = spawn_app("producers", Options::default()).await;
    let prefix = app.names.prefix().to_string();
    let schema = tempfile::NamedTempFile::new().unwrap();
    let printed = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("schema")
        .output()
        .unwrap();
    std::fs::write(schema.path(), &printed.stdout).unwrap();

    // A jobs exchange without herald's alternate exchange: there, an unroutable job comes back.
    let bare = format!("{prefix}.bare");
    let channel = app.conn.create_channel().await.unwrap();
    channel
        .exchange_declare(
            format!("{bare}.jobs").into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let started = Instant::now();
    let url = common::broker_url();
    let runs: BTreeMap<&str, Runs> = std::thread::scope(|scope| {
        let handles: Vec<_> = EXAMPLES
            .iter()
            .map(|(lang, _)| {
                let jobs = [
                    app.job(&format!("{lang}-1"), "u1"),
                    app.job(&format!("{lang}-2"), "u2"),
                    app.job_for("nope", &format!("{lang}-unroutable"), "u3"),
                ];
                let ndjson: String = jobs.iter().map(|j| format!("{j}\n")).collect();
                let lost = app
                    .job_for("nope", &format!("{lang}-lost"), "u4")
                    .to_string();
                let (url, prefix, bare) = (url.as_str(), prefix.as_str(), bare.as_str());
                let schema = schema.path().to_str().unwrap();
                scope.spawn(move || {
                    let env = |prefix| {
                        [
                            ("AMQP_URL", url),
                            ("HERALD_PREFIX", prefix),
                            ("HERALD_SCHEMA", schema),
                        ]
                    };
                    let missing = format!("{prefix}.missing");
                    let runs = Runs {
                        published: run_example(lang, &ndjson, &env(prefix)),
                        returned: run_example(lang, &lost, &env(bare)),
                        no_exchange: run_example(lang, &lost, &env(&missing)),
                    };
                    (*lang, runs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("six examples ran in {:?}", started.elapsed());
    channel
        .exchange_delete(
            format!("{bare}.jobs").into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();

    for (lang, runs) in &runs {
        let out = &runs.published;
        assert!(out.status.success(), "{}", describe(lang, out));
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(
            ids,
            [
                format!("{lang}-1"),
                format!("{lang}-2"),
                format!("{lang}-unroutable")
            ],
            "{lang}/run prints each id once confirmed"
        );

        let out = &runs.returned;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && stderr.contains(&format!("job {lang}-lost was returned"))
                && stderr.contains("netease.nope"),
            "a returned job is an error naming the job and routing key\n{}",
            describe(lang, out)
        );
        assert!(out.stdout.is_empty(), "{}", describe(lang, out));

        let out = &runs.no_exchange;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && stderr.contains("NOT_FOUND")
                && stderr.contains(&format!("did herald declare {prefix}.missing.jobs?")),
            "a missing exchange is an error that says what to check\n{}",
            describe(lang, out)
        );
    }

    let expected = EXAMPLES.len() * 2;
    app.wait_for_distinct_jobs(expected, Duration::from_secs(30))
        .await;
    let delivered = app.deliveries_by_id();
    for (lang, _) in EXAMPLES {
        for n in 1..=2 {
            assert_eq!(
                delivered.get(&format!("{lang}-{n}")),
                Some(&1),
                "the sandbox received {lang}-{n} once: {delivered:?}"
            );
        }
    }

    // The unroutable jobs show the AMQP properties each example set.
    app.wait_for_dead(EXAMPLES.len(), Duration::from_secs(10))
        .await;
    let mut dead = BTreeMap::new();
    dlq::scan(&app.conn, &app.names, |d| {
        let p = &d.properties;
        let body: Value = serde_json::from_slice(&d.data).unwrap();
        dead.insert(
            p.message_id().as_ref().map(|m| m.to_string()),
            (
                p.content_type().as_ref().map(|c| c.to_string()),
                *p.delivery_mode(),
                d.routing_key.to_string(),
                body["id"].clone(),
                dlq::DeadJob::from_delivery(d).reason,
            ),
        );
    })
    .await
    .unwrap();
    for (lang, _) in EXAMPLES {
        let id = format!("{lang}-unroutable");
        assert_eq!(
            dead.get(&Some(id.clone())),
            Some(&(
                Some("application/json".to_string()),
                Some(2),
                "netease.nope".to_string(),
                Value::from(id.clone()),
                Reason::Unroutable
            )),
            "{lang}: message_id = id, JSON, persistent, routing key <vendor>.<account>: {dead:?}"
        );
    }
}

/// The committed schema, through real validators (Python jsonschema, Node ajv):
/// an id over 255 bytes of UTF-8 is refused before anything is published, and
/// the longest ids herald takes in each case pass.
#[test]
fn the_schema_validators_hold_ids_to_herald_s_byte_limit() {
    if !missing_toolchains().is_empty() {
        assert_eq!(
            std::env::var("HERALD_SKIP_PRODUCERS").as_deref(),
            Ok("1"),
            "run `make producers-setup`"
        );
        return;
    }
    let job = |id: &str| {
        serde_json::json!({"id": id, "vendor": "netease", "account": "default", "from": "s",
                           "to": {"user": "u"}, "key": "k", "data": 1})
        .to_string()
    };
    // Nothing listens here: a job the schema lets through fails to connect instead.
    let env = [("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")];
    for lang in ["python", "node"] {
        for id in ["测".repeat(86), "😀".repeat(64), "a".repeat(129)] {
            let out = run_example(lang, &job(&id), &env);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success()
                    && (stderr.contains("herald job schema at id:")
                        || stderr.contains("herald job schema at /id:")),
                "{} bytes: {}",
                id.len(),
                describe(lang, &out)
            );
        }
        for id in ["测".repeat(85), "😀".repeat(63), "a".repeat(128)] {
            let out = run_example(lang, &job(&id), &env);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !stderr.contains("does not match the herald job schema"),
                "{} bytes passes the schema: {}",
                id.len(),
                describe(lang, &out)
            );
        }
    }
}
