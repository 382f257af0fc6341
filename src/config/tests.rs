use std::time::Duration;

use url::Url;

use super::*;

const BASE: &str = r#"
[broker]
url = "amqp://guest:hunter2@127.0.0.1:5672/%2f"

[[account]]
vendor = "netease"
name = "default"
base_url = "https://api.netease.im/nimserver"
app_key = "key1"
app_secret = "s3cr3t-value"
rate_limit = 100
"#;

fn parse(text: &str) -> anyhow::Result<Config> {
    Config::parse(text, Vec::new())
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = parse(BASE).unwrap();
    assert_eq!(c.broker.prefix, "herald");
    assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.retry.tiers.len(), 6);
    assert_eq!(c.accounts[0].rate_limit, Some(100));
    assert_eq!(
        c.accounts[0].credentials.get("app_secret"),
        Some("s3cr3t-value")
    );
}

#[test]
fn config_check_output_never_contains_secrets() {
    let c = parse(BASE).unwrap();
    let shown = format!("{}\n{:?}", c.redacted_toml(), c);
    assert!(!shown.contains("s3cr3t-value"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("[redacted]") && shown.contains("guest:****@"),
        "{shown}"
    );
    assert!(
        shown.contains("key1"),
        "non-secret keys stay visible: {shown}"
    );
}

#[test]
fn a_broker_url_without_a_host_is_refused_without_printing_it() {
    let err = parse(&BASE.replace(
        "amqp://guest:hunter2@127.0.0.1:5672/%2f",
        "amqp:guest:hunter2@127.0.0.1:5672",
    ))
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("no host") && !msg.contains("hunter2"), "{msg}");
}

#[test]
fn broker_errors_are_scrubbed_of_the_url_and_its_password() {
    let url = BrokerUrl::new("amqp:guest:hun%40ter2@127.0.0.1:5672");
    let lapin = "Invalid URL: 'amqp:guest:hun%40ter2@127.0.0.1:5672' (login hun@ter2)";
    let shown = format!("{url} {url:?} {}", url.scrub(lapin));
    assert!(!shown.contains("hun"), "{shown}");
    assert!(shown.contains("amqp://<unparseable URL>"), "{shown}");
}

#[test]
fn a_toml_syntax_error_names_the_place_without_quoting_the_line() {
    let err = parse(&BASE.replace("hunter2@", "hun\"ter2@")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("line 3, column"), "{msg}");
    assert!(!msg.contains("ter2"), "{msg}");
}

#[test]
fn unknown_top_level_key_is_named() {
    let err = parse(&format!("{BASE}\n[brokr]\nx = 1\n")).unwrap_err();
    assert!(format!("{err:#}").contains("brokr"), "{err:#}");
}

#[test]
fn unknown_account_key_lists_the_known_ones() {
    let err = parse(&BASE.replace("rate_limit", "app_scret = \"x\"\nrate_limit")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("unknown key `app_scret`") && msg.contains("app_secret"),
        "{msg}"
    );
}

#[test]
fn missing_secret_says_how_to_provide_it() {
    let err = parse(&BASE.replace("app_secret = \"s3cr3t-value\"\n", "")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("HERALD_ACCOUNT_NETEASE_DEFAULT_APP_SECRET"),
        "{msg}"
    );
}

#[test]
fn environment_supplies_secret_and_broker_url() {
    let text = BASE.replace("app_secret = \"s3cr3t-value\"\n", "");
    let env = vec![
        (
            "HERALD_ACCOUNT_NETEASE_DEFAULT_APP_SECRET".to_string(),
            "from-env".to_string(),
        ),
        (
            "HERALD_BROKER_URL".to_string(),
            "amqp://u:p@10.0.0.1:5672/%2f".to_string(),
        ),
    ];
    let c = Config::parse(&text, env).unwrap();
    assert_eq!(
        c.accounts[0].credentials.get("app_secret"),
        Some("from-env")
    );
    assert_eq!(
        c.broker.url.nodes()[0].expose(),
        "amqp://u:p@10.0.0.1:5672/%2f"
    );
}

const CLUSTER: &str = r#"url = [
  "amqp://guest:pw-one@rabbit-1:5672/%2f",
  "amqp://guest:pw-two@rabbit-2:5672/%2f",
  "amqps://guest:pw-three@rabbit-3:5671/%2f",
]"#;

fn with_url(url_line: &str) -> String {
    BASE.replace(
        "url = \"amqp://guest:hunter2@127.0.0.1:5672/%2f\"",
        url_line,
    )
}

fn error(text: &str, env: Vec<(String, String)>) -> String {
    format!("{:#}", Config::parse(text, env).unwrap_err())
}

#[test]
fn a_broker_url_may_list_every_node_of_a_cluster_each_password_redacted() {
    let c = parse(&with_url(CLUSTER)).unwrap();
    let hosts: Vec<_> = c
        .broker
        .url
        .nodes()
        .iter()
        .map(|n| {
            Url::parse(n.expose())
                .unwrap()
                .host_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(hosts, ["rabbit-1", "rabbit-2", "rabbit-3"], "in order");
    let shown = format!("{}\n{:?}\n{}", c.redacted_toml(), c, c.broker.url);
    for pw in ["pw-one", "pw-two", "pw-three"] {
        assert!(!shown.contains(pw), "{shown}");
    }
    assert!(
            shown.contains("amqp://guest:****@rabbit-1:5672/%2f, amqp://guest:****@rabbit-2:5672/%2f, amqps://guest:****@rabbit-3:5671/%2f"),
            "{shown}"
        );
    // `config check` prints the list as a list, and it reads back as one.
    let printed: toml::Table = toml::from_str(&c.redacted_toml()).unwrap();
    assert_eq!(printed["broker"]["url"].as_array().map(Vec::len), Some(3));
    // One URL stays a string.
    let one: toml::Table = toml::from_str(&parse(BASE).unwrap().redacted_toml()).unwrap();
    assert_eq!(
        one["broker"]["url"].as_str(),
        Some("amqp://guest:****@127.0.0.1:5672/%2f")
    );
}

#[test]
fn herald_broker_url_takes_a_comma_separated_list() {
    let env = |v: &str| vec![("HERALD_BROKER_URL".to_string(), v.to_string())];
    let c = Config::parse(
        BASE,
        env("amqp://u:p1@10.0.0.1:5672/%2f, amqp://u:p2@10.0.0.2:5672/%2f"),
    )
    .unwrap();
    let nodes: Vec<_> = c.broker.url.nodes().iter().map(|n| n.expose()).collect();
    assert_eq!(
        nodes,
        [
            "amqp://u:p1@10.0.0.1:5672/%2f",
            "amqp://u:p2@10.0.0.2:5672/%2f"
        ]
    );
    let c = Config::parse(BASE, env("amqp://u:p%2Cq@10.0.0.1:5672/%2f")).unwrap();
    assert_eq!(
        c.broker.url.nodes().len(),
        1,
        "an encoded comma is no separator"
    );
    // A raw comma in a password splits the URL: refused, without a piece of the password.
    let err = error(BASE, env("amqp://u:S3CRET,xq7z@10.0.0.1:5672/%2f"));
    assert!(
        err.contains("broker.url[0]") && err.contains("%2C"),
        "{err}"
    );
    assert!(!err.contains("S3CRET") && !err.contains("xq7z"), "{err}");
    let err = error(
        BASE,
        env("amqp://u:p@10.0.0.1:5672/%2f,,amqp://u:p@10.0.0.2/%2f"),
    );
    assert!(err.contains("broker.url[1] is empty"), "{err}");
}

#[test]
fn a_bad_node_list_is_refused_naming_the_node_without_its_password() {
    let cases = [
        ("url = []", "broker.url lists no node"),
        ("url = 5672", "must be an AMQP URL or an array of them"),
        (
            "url = [\"amqp://u:pw-1@a/%2f\", 5]",
            "must be an AMQP URL or an array of them",
        ),
        (
            "url = [\"amqp://u:pw-1@a/%2f\", \"http://u:pw-2@b/%2f\"]",
            "broker.url[1] (http://u:****@b/%2f) must use amqp:// or amqps://, not http://",
        ),
        (
            "url = [\"amqp://u:pw-1@a/%2f\", \"amqp:u:pw-2@b\"]",
            "broker.url[1] (amqp://<unparseable URL>) has no host",
        ),
        (
            "url = [\"amqp://u:pw-1@a/%2f\", \"amqp://u:pw-1@a/%2f\"]",
            "broker.url[1] (amqp://u:****@a/%2f) is listed twice",
        ),
        (
            "url = [\"amqp://u:pw-1@a/%2f\", \"amqp://u:pw-2@b/orders\"]",
            "broker.url[1] (amqp://u:****@b/orders) names vhost `orders` but broker.url[0] names `/`",
        ),
    ];
    for (line, expected) in cases {
        let err = error(&with_url(line), Vec::new());
        assert!(err.contains(expected), "{line}: {err}");
        assert!(!err.contains("pw-"), "{line}: {err}");
    }
    // No path is the default vhost, as `%2f` is.
    assert!(parse(&with_url("url = [\"amqp://a\", \"amqp://c/%2f\"]")).is_ok());
}

#[test]
fn environment_override_for_a_missing_account_is_an_error() {
    let env = vec![(
        "HERALD_ACCOUNT_NETEASE_OTHER_APP_SECRET".to_string(),
        "x".to_string(),
    )];
    let err = Config::parse(BASE, env).unwrap_err();
    assert!(format!("{err:#}").contains("matches no configured account"));
}

#[test]
fn a_prefix_too_long_for_amqp_queue_names_is_rejected() {
    let long = BASE.replace(
        "[broker]",
        &format!("[broker]\nprefix = \"{}\"", "p".repeat(129)),
    );
    let err = parse(&long).unwrap_err();
    assert!(
        format!("{err:#}").contains("broker.prefix is 129 bytes, at most 128"),
        "{err:#}"
    );
    let fits = BASE.replace(
        "[broker]",
        &format!("[broker]\nprefix = \"{}\"", "p".repeat(128)),
    );
    assert!(parse(&fits).is_ok());
}

#[test]
fn duplicate_account_is_rejected() {
    let dup = format!("{BASE}{}", &BASE[BASE.find("[[account]]").unwrap()..]);
    let err = parse(&dup).unwrap_err();
    assert!(format!("{err:#}").contains("duplicate account"), "{err:#}");
}

#[test]
fn a_secret_written_as_a_number_is_never_quoted_in_an_error() {
    let numeric = BASE.replace("\"s3cr3t-value\"", "98765432123456789");
    let c = parse(&numeric).unwrap();
    assert_eq!(
        c.accounts[0].credentials.get("app_secret"),
        Some("98765432123456789")
    );
    let float = BASE.replace("\"s3cr3t-value\"", "98765.4321");
    let err = format!("{:#}", parse(&float).unwrap_err());
    assert!(!err.contains("98765"), "{err}");
    let token = BASE.replace("[broker]", "[http]\nenqueue_token = 98765.4321\n[broker]");
    let err = format!("{:#}", parse(&token).unwrap_err());
    assert!(!err.contains("98765"), "{err}");
}

#[test]
fn two_accounts_of_one_vendor_app_are_rejected() {
    let second = BASE[BASE.find("[[account]]").unwrap()..].replace("\"default\"", "\"other\"");
    let err = parse(&format!("{BASE}{second}")).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("accounts `default` and `other` both use netease app_key"),
        "{err}"
    );
}

#[test]
fn the_heartbeat_is_whole_seconds_and_the_consumer_timeout_at_least_two() {
    let c = parse(BASE).unwrap();
    assert_eq!(c.broker.heartbeat, Duration::from_secs(60));
    assert_eq!(c.broker.consumer_timeout, Duration::from_secs(1800));
    for bad in [
        "heartbeat = \"0s\"",
        "heartbeat = \"1500ms\"",
        "heartbeat = \"20h\"",
    ] {
        let err = parse(&BASE.replace("[broker]", &format!("[broker]\n{bad}"))).unwrap_err();
        assert!(
            format!("{err:#}").contains("broker.heartbeat"),
            "{bad}: {err:#}"
        );
    }
    let err = parse(&BASE.replace("[broker]", "[broker]\nconsumer_timeout = \"1s\"")).unwrap_err();
    assert!(
        format!("{err:#}").contains("broker.consumer_timeout"),
        "{err:#}"
    );
    let c = parse(&BASE.replace("[broker]", "[broker]\nheartbeat = \"4s\"")).unwrap();
    assert_eq!(c.broker.heartbeat, Duration::from_secs(4));
}

#[test]
fn one_app_key_is_one_account_whatever_url_reaches_it() {
    let second = BASE[BASE.find("[[account]]").unwrap()..]
        .replace("\"default\"", "\"other\"")
        .replace(
            "https://api.netease.im/nimserver",
            "https://api.yunxinapi.com/nimserver/",
        )
        .replace("\"key1\"", "\" key1 \"");
    let err = format!("{:#}", parse(&format!("{BASE}{second}")).unwrap_err());
    assert!(
        err.contains("accounts `default` and `other` both use netease app_key `key1`")
            && err.contains("api.yunxinapi.com"),
        "{err}"
    );
    // Through the environment too.
    let other = BASE[BASE.find("[[account]]").unwrap()..]
        .replace("\"default\"", "\"other\"")
        .replace("app_key = \"key1\"\n", "");
    let env = vec![(
        "HERALD_ACCOUNT_NETEASE_OTHER_APP_KEY".to_string(),
        "key1".to_string(),
    )];
    let err = format!(
        "{:#}",
        Config::parse(&format!("{BASE}{other}"), env).unwrap_err()
    );
    assert!(err.contains("both use netease app_key `key1`"), "{err}");
    // Two apps are two accounts.
    let distinct = BASE[BASE.find("[[account]]").unwrap()..]
        .replace("\"default\"", "\"other\"")
        .replace("\"key1\"", "\"key2\"");
    assert!(parse(&format!("{BASE}{distinct}")).is_ok());
}

#[test]
fn bad_urls_are_rejected() {
    let err = parse(&BASE.replace("https://api.netease.im/nimserver", "not a url")).unwrap_err();
    assert!(format!("{err:#}").contains("base_url"), "{err:#}");
    let err = parse(&BASE.replace("amqp://guest", "http://guest")).unwrap_err();
    assert!(format!("{err:#}").contains("amqp://"), "{err:#}");
    let err = parse(&BASE.replace(
        "https://api.netease.im",
        "https://admin:S3CRET@api.netease.im",
    ))
    .unwrap_err();
    assert!(format!("{err:#}").contains("credentials"), "{err:#}");
    assert!(!format!("{err:#}").contains("S3CRET"), "{err:#}");
}

#[test]
fn unknown_vendor_is_rejected_with_the_known_list() {
    let err = parse(&BASE.replace("vendor = \"netease\"", "vendor = \"netease2\"")).unwrap_err();
    assert!(
        format!("{err:#}").contains("unknown vendor `netease2`"),
        "{err:#}"
    );
}

#[test]
fn an_account_may_have_its_own_retry_schedule_and_all_tiers_are_declared() {
    let text = format!("{BASE}\n[account.retry]\ntiers = [\"2s\", \"1s\"]\nmax_attempts = 3\n");
    let c = parse(&text).unwrap();
    let policy = c.policy_for(&c.accounts[0]);
    assert_eq!((policy.tiers.len(), policy.max_attempts), (2, 3));
    assert_eq!(policy.ban, Duration::from_secs(10), "NetEase's block time");
    assert_eq!(c.all_tiers().first(), Some(&Duration::from_secs(1)));
    assert_eq!(
        c.all_tiers().len(),
        7,
        "1s shared, 2s added to the 6 defaults"
    );
    let err = parse(&format!("{BASE}\n[account.retry]\ntiers = [\"0s\"]\n")).unwrap_err();
    assert!(format!("{err:#}").contains("longer than zero"), "{err:#}");
}

#[test]
fn the_enqueue_token_comes_from_the_environment_and_is_never_shown() {
    let token = "enqueue-token-from-env-0123456789";
    let env = vec![("HERALD_HTTP_ENQUEUE_TOKEN".to_string(), token.to_string())];
    let c = Config::parse(BASE, env).unwrap();
    assert_eq!(
        c.http.enqueue_token.as_ref().map(Secret::expose),
        Some(token)
    );
    assert_eq!(c.http.enqueue_max_bytes, 1024 * 1024);
    let shown = format!("{}\n{:?}", c.redacted_toml(), c);
    assert!(!shown.contains(token), "{shown}");
    assert!(shown.contains("enqueue_token = \"[redacted]\""), "{shown}");
}

#[test]
fn a_short_or_orphaned_enqueue_token_is_refused() {
    let err = parse(&format!("{BASE}\n[http]\nenqueue_token = \"short\"\n")).unwrap_err();
    assert!(format!("{err:#}").contains("at least 16"), "{err:#}");
    assert!(!format!("{err:#}").contains("short"), "{err:#}");
    let err = parse(&format!(
        "{BASE}\n[http]\nenqueue_token_previous = \"old-token-0123456789\"\n"
    ))
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("without http.enqueue_token"),
        "{err:#}"
    );
}

#[test]
fn account_name_with_a_dot_is_rejected() {
    let err = parse(&BASE.replace("name = \"default\"", "name = \"a.b\"")).unwrap_err();
    assert!(format!("{err:#}").contains("routing key"), "{err:#}");
}

#[test]
fn the_vendor_checks_its_own_keys_when_the_config_is_read() {
    let tencent = r#"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[[account]]
vendor = "tencent"
name = "main"
base_url = "https://console.tim.qq.com"
sdk_app_id = "SDKAPPID"
secret_key = "k"
admin_identifier = "administrator"
"#;
    let err = format!("{:#}", parse(tencent).unwrap_err());
    assert!(
        err.contains("in [[account]] #1 (tencent.main)")
            && err.contains("sdk_app_id must be the numeric SDKAppID"),
        "{err}"
    );
    let short_key = tencent.replace(
        "\"SDKAPPID\"",
        "1400000000\ncallback_token = \"t\"\ncallback_key = \"short\"",
    );
    let err = format!("{:#}", parse(&short_key).unwrap_err());
    assert!(err.contains("at least 32"), "{err}");
    assert!(parse(&tencent.replace("\"SDKAPPID\"", "1400000000")).is_ok());
}
