//! The job contract, version 1: the JSON document producers publish.
//!
//! Parsing is strict (unknown fields are errors, a missing `v` means 1) and every
//! error names the field, so a producer in any language can fix its message from
//! the DLQ's `x-herald-error` alone. `herald schema` prints the JSON Schema.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The contract version this herald speaks.
pub const VERSION: u32 = 1;

/// Longest job id in characters; it travels in AMQP `message_id` and vendor fields.
pub const MAX_ID_LEN: usize = 128;

/// Longest job id in bytes of UTF-8: `message_id` is an AMQP short string.
pub const MAX_ID_BYTES: usize = 255;

/// Longest `vendor`, in bytes: `vendor.account` is the routing key, an AMQP short string.
pub const MAX_VENDOR_BYTES: usize = 32;

/// Longest `account`, in bytes; with `vendor` it keeps the routing key under 255 bytes.
pub const MAX_ACCOUNT_BYTES: usize = 100;

/// One notification to deliver through one vendor account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "herald job v1")]
pub struct Job {
    /// Contract version; only 1 exists. Defaults to 1 when missing.
    #[serde(default = "version_one")]
    #[schemars(range(min = 1, max = 1))]
    pub v: u32,
    /// Stable id of this job, unique per producer; also the AMQP `message_id`.
    /// At most 128 characters and at most 255 bytes of UTF-8 (an AMQP short
    /// string). The schema's `anyOf` holds ids to that byte limit: any ASCII id
    /// up to 128 characters, any id up to 85 characters outside the astral
    /// planes, any id up to 63 characters.
    #[schemars(length(min = 1, max = 128))]
    pub id: String,
    /// Vendor id, one of the vendors this herald speaks.
    #[schemars(length(min = 1, max = 32))]
    pub vendor: String,
    /// Name of the configured account of that vendor. At most 100 bytes of UTF-8
    /// (`vendor.account` is the AMQP routing key, a short string).
    #[schemars(length(min = 1, max = 100))]
    pub account: String,
    /// Sender: a vendor user id or system account.
    #[schemars(length(min = 1))]
    pub from: String,
    /// Receiver: exactly one of `{"user": …}` or `{"group": …}`.
    pub to: Recipient,
    /// Business key, so clients can route the notification.
    #[schemars(length(min = 1))]
    pub key: String,
    /// Business data: a string, or any JSON value (sent as its compact JSON text).
    pub data: Value,
    /// `online`: only to connected clients; `persistent`: stored for offline clients.
    #[serde(default)]
    pub delivery: Delivery,
    /// Offline push presentation, where the vendor supports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,
    /// After this instant the job is dead-lettered as `expired` instead of sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Vendor fields with no common meaning, checked against the vendor's known set.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub options: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Recipient {
    User(#[schemars(length(min = 1))] String),
    Group(#[schemars(length(min = 1))] String),
}

impl Recipient {
    pub fn id(&self) -> &str {
        match self {
            Recipient::User(id) | Recipient::Group(id) => id,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    Online,
    #[default]
    Persistent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Push {
    /// Text of the push notification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// JSON object handed to the push service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Map<String, Value>>,
    /// Name of the client's sound file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound: Option<String>,
}

fn version_one() -> u32 {
    VERSION
}

/// Why a body is not a valid job; the text goes to `x-herald-error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JobError(pub String);

impl Job {
    /// Parses and checks a job body against the contract (not yet against config or vendor).
    pub fn parse(body: &[u8], max_bytes: usize) -> Result<Job, JobError> {
        check_size(body.len(), max_bytes)?;
        // Most jobs parse: without tracking the path, which costs a third of the
        // parse. A job that does not is parsed again, for the path in its error.
        let job: Job = match serde_json::from_slice(body) {
            Ok(job) => job,
            Err(plain) => return Err(Self::explain(body, plain)),
        };
        job.check()?;
        Ok(job)
    }

    /// Why `body` is not a job, naming the field where parsing failed.
    fn explain(body: &[u8], plain: serde_json::Error) -> JobError {
        let mut de = serde_json::Deserializer::from_slice(body);
        if let Err(e) = serde_path_to_error::deserialize::<_, Job>(&mut de) {
            let path = e.path().to_string();
            let inner = e.into_inner();
            return if path == "." || path == "?" || path.is_empty() {
                JobError(format!("malformed job: {inner}"))
            } else {
                JobError(format!("malformed job at `{path}`: {inner}"))
            };
        }
        match de.end() {
            Err(e) => JobError(format!(
                "malformed job: trailing data after the JSON object: {e}"
            )),
            // Both parsers agree on what a job is; this is the first one's word.
            Ok(()) => JobError(format!("malformed job: {plain}")),
        }
    }

    /// Checks a job built elsewhere (a callback's rebuild) against the contract, as `parse` does.
    pub fn check(&self) -> Result<(), JobError> {
        if self.v != VERSION {
            return Err(JobError(format!(
                "unsupported contract version v={}; this herald speaks v{VERSION}",
                self.v
            )));
        }
        let id_len = self.id.chars().count();
        if id_len == 0
            || id_len > MAX_ID_LEN
            || self.id.len() > MAX_ID_BYTES
            || self.id.chars().any(char::is_control)
        {
            return Err(JobError(format!(
                "`id` must be 1-{MAX_ID_LEN} printable characters and at most {MAX_ID_BYTES} bytes \
                 of UTF-8 (it is the AMQP message_id); this one is {id_len} characters, {} bytes",
                self.id.len()
            )));
        }
        for (field, value, max) in [
            ("vendor", &self.vendor, MAX_VENDOR_BYTES),
            ("account", &self.account, MAX_ACCOUNT_BYTES),
        ] {
            if value.len() > max {
                return Err(JobError(format!(
                    "`{field}` is {} bytes, at most {max} bytes of UTF-8 are allowed \
                     (it is part of the AMQP routing key)",
                    value.len()
                )));
            }
        }
        for (field, value) in [
            ("vendor", &self.vendor),
            ("account", &self.account),
            ("from", &self.from),
            ("key", &self.key),
        ] {
            if value.is_empty() {
                return Err(JobError(format!("`{field}` must not be empty")));
            }
        }
        if self.to.id().is_empty() {
            return Err(JobError("`to` must name a user or group".into()));
        }
        Ok(())
    }

    /// `vendor.account`: the routing key of the job's lane.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.vendor, self.account)
    }

    /// `data` as the vendors carry it: a string as is, anything else as compact JSON.
    pub fn data_text(&self) -> String {
        match &self.data {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

/// A job body of `len` bytes fits the worker's `max_bytes` limit.
pub fn check_size(len: usize, max_bytes: usize) -> Result<(), JobError> {
    if len > max_bytes {
        return Err(JobError(format!(
            "job is {len} bytes, larger than the {max_bytes}-byte limit"
        )));
    }
    Ok(())
}

/// Where the schema says it lives; stable for the life of contract v1.
pub const SCHEMA_ID: &str = "https://herald.dev/schema/job-v1.json";

/// The JSON Schema (draft 2020-12) of the contract, committed as
/// `docs/job.schema.json`. What JSON Schema cannot say (byte limits, vendor
/// field limits, configured accounts) is in the descriptions, and checked by
/// `herald enqueue --check`.
pub fn schema() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Job)).expect("schema serializes");
    schema["$id"] = Value::String(SCHEMA_ID.into());
    let vendors: Vec<Value> = crate::vendor::VENDORS
        .iter()
        .map(|v| Value::String(v.id.into()))
        .collect();
    schema["properties"]["vendor"]["enum"] = Value::Array(vendors);
    // Control characters (Unicode Cc, as `char::is_control`) are refused in ids.
    schema["properties"]["id"]["pattern"] =
        Value::String("^[^\\u0000-\\u001F\\u007F-\\u009F]+$".into());
    schema["properties"]["id"]["anyOf"] = id_byte_limit();
    // A job can only be delivered through a configured account, and account
    // names are `a-z 0-9 - _`, 1-64 characters (`config`): ASCII, so the
    // schema's count is the byte count.
    schema["properties"]["account"]["pattern"] = Value::String("^[a-z0-9_-]+$".into());
    schema["properties"]["account"]["maxLength"] = Value::from(crate::config::MAX_ACCOUNT_NAME_LEN);
    schema
}

/// JSON Schema counts characters, not bytes; these three cases keep an id
/// within [`MAX_ID_BYTES`] of UTF-8 and never let through one herald refuses:
/// ASCII (a byte each) up to [`MAX_ID_LEN`], the Basic Multilingual Plane (at
/// most 3 bytes each) up to 85 characters, anything (at most 4) up to 63.
/// A longer mixed id that still fits is refused by the schema alone.
fn id_byte_limit() -> Value {
    serde_json::json!([
        {"maxLength": MAX_ID_LEN, "pattern": "^[\\u0000-\\u007F]*$"},
        {"maxLength": MAX_ID_BYTES / 3, "pattern": "^[\\u0000-\\uFFFF]*$"},
        {"maxLength": MAX_ID_BYTES / 4}
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
      "v": 1, "id": "order-8812-shipped", "vendor": "netease", "account": "default",
      "from": "system", "to": {"user": "2839678182"}, "key": "order.shipped",
      "data": {"order": 8812}, "delivery": "persistent",
      "push": {"content": "Your order shipped", "payload": {"k": "v"}, "sound": "ding"},
      "expires_at": "2026-11-23T00:00:00Z", "options": {}
    }"#;

    fn parse(s: &str) -> Result<Job, JobError> {
        Job::parse(s.as_bytes(), 64 * 1024)
    }

    #[test]
    fn design_example_parses() {
        let job = parse(EXAMPLE).unwrap();
        assert_eq!(job.to, Recipient::User("2839678182".into()));
        assert_eq!(job.delivery, Delivery::Persistent);
        assert_eq!(job.data_text(), r#"{"order":8812}"#);
        assert_eq!(job.routing_key(), "netease.default");
    }

    #[test]
    fn missing_v_means_one_and_delivery_defaults_to_persistent() {
        let job = parse(r#"{"id":"a","vendor":"netease","account":"x","from":"s","to":{"group":"g"},"key":"k","data":"d"}"#).unwrap();
        assert_eq!(job.v, 1);
        assert_eq!(job.delivery, Delivery::Persistent);
        assert_eq!(job.data_text(), "d");
    }

    #[test]
    fn unknown_top_level_field_is_named() {
        let err = parse(&EXAMPLE.replace("\"options\"", "\"optoins\"")).unwrap_err();
        assert!(err.0.contains("optoins"), "{err}");
    }

    #[test]
    fn recipient_must_be_user_or_group() {
        let err =
            parse(&EXAMPLE.replace(r#"{"user": "2839678182"}"#, r#"{"room": "1"}"#)).unwrap_err();
        assert!(err.0.contains("`to`") && err.0.contains("room"), "{err}");
    }

    #[test]
    fn malformed_json_says_so() {
        let err = parse("{\"id\": ").unwrap_err();
        assert!(err.0.starts_with("malformed job"), "{err}");
    }

    #[test]
    fn other_versions_are_refused() {
        let err = parse(&EXAMPLE.replace("\"v\": 1", "\"v\": 2")).unwrap_err();
        assert!(err.0.contains("v=2"), "{err}");
    }

    #[test]
    fn oversize_body_is_refused_before_parsing() {
        let err = Job::parse(EXAMPLE.as_bytes(), 10).unwrap_err();
        assert!(err.0.contains("larger than the 10-byte limit"), "{err}");
    }

    #[test]
    fn empty_id_is_refused() {
        let err = parse(&EXAMPLE.replace("order-8812-shipped", "")).unwrap_err();
        assert!(err.0.contains("`id`"), "{err}");
    }

    #[test]
    fn an_id_within_128_characters_but_over_255_bytes_is_refused_naming_both_limits() {
        let id = "测".repeat(90);
        let err = parse(&EXAMPLE.replace("order-8812-shipped", &id)).unwrap_err();
        assert!(
            err.0.contains("`id`") && err.0.contains("128") && err.0.contains("255 bytes"),
            "{err}"
        );
        assert!(err.0.contains("90 characters, 270 bytes"), "{err}");
    }

    #[test]
    fn an_id_of_exactly_255_bytes_or_128_characters_is_accepted() {
        // 85 three-byte characters: 255 bytes.
        assert!(parse(&EXAMPLE.replace("order-8812-shipped", &"测".repeat(85))).is_ok());
        assert!(parse(&EXAMPLE.replace("order-8812-shipped", &"a".repeat(MAX_ID_LEN))).is_ok());
        let err =
            parse(&EXAMPLE.replace("order-8812-shipped", &"a".repeat(MAX_ID_LEN + 1))).unwrap_err();
        assert!(err.0.contains("129 characters"), "{err}");
    }

    #[test]
    fn a_vendor_over_32_bytes_is_refused_naming_the_field_and_limit() {
        let err =
            parse(&EXAMPLE.replace("\"netease\"", &format!("\"{}\"", "é".repeat(17)))).unwrap_err();
        assert!(
            err.0.contains("`vendor` is 34 bytes") && err.0.contains("at most 32 bytes"),
            "{err}"
        );
    }

    #[test]
    fn an_account_over_100_bytes_is_refused_naming_the_field_and_limit() {
        let long = "账".repeat(34);
        let err = parse(&EXAMPLE.replace("\"default\"", &format!("\"{long}\""))).unwrap_err();
        assert!(
            err.0.contains("`account` is 102 bytes") && err.0.contains("at most 100 bytes"),
            "{err}"
        );
        let fits = "a".repeat(MAX_ACCOUNT_BYTES);
        let job = parse(&EXAMPLE.replace("\"default\"", &format!("\"{fits}\""))).unwrap();
        assert!(job.routing_key().len() <= 255);
    }

    #[test]
    fn a_number_beyond_u64_in_data_is_read_back_as_the_same_double() {
        // Found by fuzz/job_parse: serde_json's default float parser read herald's own
        // output of this number back a few ulps off.
        let big = format!("1555515{}", "5".repeat(42));
        let job = parse(&EXAMPLE.replace(r#"{"order": 8812}"#, &format!("[{big}]"))).unwrap();
        assert_eq!(job.data_text(), "[1.5555155555555555e+48]");
        let again = Job::parse(&serde_json::to_vec(&job).unwrap(), usize::MAX).unwrap();
        assert_eq!(again, job);
    }

    #[test]
    fn schema_states_the_byte_limits_of_short_strings() {
        let schema = schema();
        let props = &schema["properties"];
        assert_eq!(props["id"]["maxLength"], 128);
        let vendors: Vec<_> = crate::vendor::VENDORS.iter().map(|v| v.id).collect();
        assert_eq!(props["vendor"]["enum"], serde_json::json!(vendors));
        assert_eq!(
            props["id"]["anyOf"][2]["maxLength"], 63,
            "63 × 4 bytes fit 255"
        );
        for (field, limit) in [("id", "255 bytes"), ("account", "100 bytes")] {
            let description = props[field]["description"].as_str().unwrap();
            assert!(description.contains(limit), "{field}: {description}");
        }
    }

    #[test]
    fn schema_is_draft_2020_12_and_closed() {
        let schema = schema();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        assert_eq!(schema["additionalProperties"], false);
        let required = schema["required"].as_array().unwrap();
        for field in ["id", "vendor", "account", "from", "to", "key", "data"] {
            assert!(required.iter().any(|r| r == field), "{field} required");
        }
    }
}
