//! deploy/ as a cluster and Prometheus would take it: the Kubernetes manifests
//! agree with each other and with the config, the alert rules shipped twice
//! are one set, and every query of the dashboard and the rules names a metric
//! herald exports. (`make lint-deploy` validates the schemas and runs promtool.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use herald::config::Config;
use herald::topology::Names;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of every file below `dir`, as JSON values.
fn documents(dir: &Path) -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                for doc in serde_norway::Deserializer::from_str(&text) {
                    let value: Value = serde::Deserialize::deserialize(doc)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    out.push((path.clone(), value));
                }
            }
        }
    }
    out
}

fn kubernetes() -> Vec<(PathBuf, Value)> {
    documents(&root().join("deploy/kubernetes"))
}

fn of_kind<'a>(docs: &'a [(PathBuf, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect()
}

fn one<'a>(docs: &'a [(PathBuf, Value)], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "one {kind} in deploy/kubernetes");
    found[0]
}

/// The Deployment named `name`: the worker is `herald`, the console `herald-console`.
fn deployment<'a>(docs: &'a [(PathBuf, Value)], name: &str) -> &'a Value {
    of_kind(docs, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Deployment {name} in deploy/kubernetes"))
}

fn configmap_toml(docs: &[(PathBuf, Value)]) -> String {
    one(docs, "ConfigMap")["data"]["herald.toml"]
        .as_str()
        .expect("the ConfigMap holds herald.toml")
        .to_string()
}

/// The environment the Deployment `name` gives its container, secret values from the example Secret.
fn deployment_env(docs: &[(PathBuf, Value)], name: &str) -> Vec<(String, String)> {
    let secret = &one(docs, "Secret")["stringData"];
    let container = &deployment(docs, name)["spec"]["template"]["spec"]["containers"][0];
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|var| {
            let name = var["name"].as_str().unwrap().to_string();
            let value = match var["valueFrom"]["secretKeyRef"]["key"].as_str() {
                Some(key) => secret[key]
                    .as_str()
                    .unwrap_or_else(|| panic!("the example Secret has no key {key} ({name})"))
                    .to_string(),
                None => var["value"].as_str().unwrap().to_string(),
            };
            (name, value)
        })
        .collect()
}

#[test]
fn the_configmap_and_the_deployments_secrets_make_a_valid_config() {
    let docs = kubernetes();
    let config = Config::parse(&configmap_toml(&docs), deployment_env(&docs, "herald"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(config.http.callback_listen.is_some());
    assert!(
        config
            .accounts
            .iter()
            .any(|a| a.vendor == "tencent" && a.credentials.get("callback_key").is_some()),
        "the callback Service has a Tencent account behind it"
    );
}

#[test]
fn keda_scales_only_on_lanes_the_configmap_configures() {
    let docs = kubernetes();
    let text = configmap_toml(&docs);
    let table: toml::Table = toml::from_str(&text).unwrap();
    let prefix = table["broker"]
        .get("prefix")
        .and_then(|p| p.as_str())
        .unwrap_or("herald");
    let names = Names::new(prefix);
    let lanes: BTreeSet<String> = table["account"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| names.lane(a["vendor"].as_str().unwrap(), a["name"].as_str().unwrap()))
        .collect();
    let auths: BTreeSet<&str> = of_kind(&docs, "TriggerAuthentication")
        .iter()
        .map(|a| a["metadata"]["name"].as_str().unwrap())
        .collect();
    let secret = &one(&docs, "Secret")["stringData"];
    for auth in of_kind(&docs, "TriggerAuthentication") {
        for target in auth["spec"]["secretTargetRef"].as_array().unwrap() {
            assert_eq!(target["name"], "herald-secrets");
            let key = target["key"].as_str().unwrap();
            assert!(secret.get(key).is_some(), "the Secret has no {key}");
        }
    }
    let scaled = of_kind(&docs, "ScaledObject");
    assert!(!scaled.is_empty());
    let mut queues = 0;
    for object in scaled {
        assert_eq!(
            object["spec"]["scaleTargetRef"]["name"],
            deployment(&docs, "herald")["metadata"]["name"]
        );
        for trigger in object["spec"]["triggers"].as_array().unwrap() {
            if trigger["type"] != "rabbitmq" {
                continue;
            }
            let queue = trigger["metadata"]["queueName"].as_str().unwrap();
            assert!(
                lanes.contains(queue),
                "KEDA scales on `{queue}`, which is no lane of the ConfigMap: {lanes:?}"
            );
            let auth = trigger["authenticationRef"]["name"].as_str().unwrap();
            assert!(auths.contains(auth), "no TriggerAuthentication {auth}");
            queues += 1;
        }
    }
    assert!(queues > 0);
}

#[test]
fn the_worker_and_the_console_run_as_the_dockerfiles_numeric_user_with_nothing_to_spare() {
    let docs = kubernetes();
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the Dockerfile sets USER");
    let uid: u64 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric USER, so runAsNonRoot can be checked");
    assert!(dockerfile.contains("HEALTHCHECK"));
    assert!(dockerfile.contains(r#"CMD ["herald", "health""#));
    for deployment in of_kind(&docs, "Deployment") {
        runs_as(&deployment["spec"]["template"]["spec"], uid);
    }
}

fn runs_as(pod: &Value, uid: u64) {
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], uid);
    for container in pod["containers"].as_array().unwrap() {
        let sc = &container["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["runAsUser"], uid);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    }
}

#[test]
fn the_console_gets_only_the_broker_and_its_token_and_no_ingress() {
    let docs = kubernetes();
    let env = deployment_env(&docs, "herald-console");
    assert!(
        env.iter()
            .all(|(name, _)| !name.starts_with("HERALD_ACCOUNT_")),
        "no vendor secret reaches the console: {env:?}"
    );
    let review = herald::config::ReviewConfig::parse(&configmap_toml(&docs), env)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let listen = review.console.listen;
    let container =
        &deployment(&docs, "herald-console")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"][0], "console");
    assert!(
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["containerPort"] == listen.port()),
        "the container exposes console.listen {listen}"
    );
    let service = of_kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "herald-console")
        .expect("a Service for the console");
    assert_eq!(
        service["spec"]["type"], "ClusterIP",
        "reached by port-forward, not from outside"
    );
    for ingress in of_kind(&docs, "Ingress") {
        assert!(
            !ingress.to_string().contains("herald-console"),
            "no Ingress routes to the console"
        );
    }
}

#[test]
fn the_callback_has_its_own_service_on_callback_listen() {
    let docs = kubernetes();
    let config = Config::parse(&configmap_toml(&docs), deployment_env(&docs, "herald")).unwrap();
    let port = config.http.callback_listen.unwrap().port();
    let container = &deployment(&docs, "herald")["spec"]["template"]["spec"]["containers"][0];
    let named = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["containerPort"] == port)
        .expect("the container exposes callback_listen")["name"]
        .clone();
    let services = of_kind(&docs, "Service");
    assert!(services.iter().any(|s| {
        s["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["targetPort"] == named)
    }));
    let ingress = one(&docs, "Ingress");
    let path = &ingress["spec"]["rules"][0]["http"]["paths"][0];
    assert_eq!(path["path"], herald::vendor::tencent::callback::PATH);
    assert_eq!(path["backend"]["service"]["name"], "herald-callback");
}

fn rules_file() -> Value {
    let text = std::fs::read_to_string(root().join("deploy/monitoring/herald-rules.yaml")).unwrap();
    serde_norway::from_str(&text).unwrap()
}

#[test]
fn the_prometheusrule_ships_exactly_the_tested_rules() {
    let docs = kubernetes();
    let rule = one(&docs, "PrometheusRule");
    assert_eq!(
        rule["spec"],
        rules_file(),
        "regenerate deploy/kubernetes/components/monitoring/prometheusrule.yaml from deploy/monitoring/herald-rules.yaml"
    );
    let monitor = one(&docs, "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
}

/// Every `herald_…` name in `expr`, without the histogram's suffixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("herald_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| herald::metrics::all().iter().any(|m| m.name == *b))
            .unwrap_or(name);
        names.push(base.to_string());
        rest = &tail[end..];
    }
    names
}

fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn every_query_of_the_dashboard_and_the_rules_names_an_exported_metric() {
    let text =
        std::fs::read_to_string(root().join("deploy/monitoring/grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let exported: BTreeSet<&str> = herald::metrics::all().iter().map(|m| m.name).collect();
    let docs = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    for (what, source) in [("dashboard", dashboard), ("rules", rules_file())] {
        let mut found = Vec::new();
        exprs(&source, &mut found);
        assert!(found.len() > 5, "{what}: {found:?}");
        let mut used = BTreeSet::new();
        for expr in &found {
            for name in metric_names(expr) {
                assert!(
                    exported.contains(name.as_str()),
                    "{what}: `{name}` in `{expr}` is not a metric herald exports"
                );
                assert!(
                    docs.contains(&format!("`{name}`")),
                    "{name} in docs/metrics.md"
                );
                used.insert(name);
            }
        }
        if what == "dashboard" {
            for needed in [
                "herald_jobs_total",
                "herald_vendor_request_seconds",
                "herald_breaker_state",
                "herald_lane_pauses_total",
                "herald_dlq_messages",
            ] {
                assert!(used.contains(needed), "the dashboard shows {needed}");
            }
        }
    }
}

#[test]
fn compose_runs_rabbitmq_4_and_checks_the_health_of_every_service() {
    let text = std::fs::read_to_string(root().join("deploy/compose.yaml")).unwrap();
    let compose: Value = serde_norway::from_str(&text).unwrap();
    let services = compose["services"].as_object().unwrap();
    let image = services["rabbitmq"]["image"].as_str().unwrap();
    assert!(image.starts_with("rabbitmq:4."), "{image}");
    for (name, service) in services {
        assert!(
            service["healthcheck"]["test"].is_array(),
            "service {name} has a healthcheck"
        );
        for dependency in service["depends_on"].as_object().into_iter().flatten() {
            assert_eq!(dependency.1["condition"], "service_healthy", "{name}");
        }
    }
}
