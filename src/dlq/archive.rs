//! `herald dlq export` and `import`: dead jobs as NDJSON, one object per job,
//! with the body and every property and header, losslessly.
//!
//! A header's text is written as `{"s": …}`, bytes that are not UTF-8 as
//! `{"b64": …}` (the body likewise: `body` or `body_base64`); any other AMQP
//! value in serde's form of it (`{"LongLongInt": 3}`). Export streams: one job
//! read, one line written. Import checks every line before it publishes the
//! first, then sends each job to the dead exchange with its routing key, so
//! that it lands in the DLQ with the fingerprint it had.

use std::collections::BTreeMap;
use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures_util::future::join_all;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};

use super::{Coverage, DeadJob, Filter, Reader, fingerprint};
use crate::audit::{self, Actor, JobRef, Outcome, Trail};
use crate::broker::Publisher;
use crate::topology::Names;

/// Jobs published per round of confirms on import.
const BATCH: usize = 500;
/// Errors an import lists before it stops listing.
const MAX_LISTED_ERRORS: usize = 20;

/// One exported dead job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Archived {
    /// The routing key it was dead-lettered with (the lane's `vendor.account`).
    pub routing_key: String,
    pub properties: ArchivedProperties,
    #[serde(default)]
    pub headers: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    /// The fingerprint it had in the DLQ; import checks it still has it.
    pub fingerprint: String,
}

/// Every AMQP basic property but the headers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchivedProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
}

impl Archived {
    /// A dead message as one archive object; the broker's `x-delivery-count` is left out.
    pub fn of(delivery: &Delivery) -> Self {
        let p = &delivery.properties;
        let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_string());
        let headers = p
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .filter(|(k, _)| k.as_str() != "x-delivery-count")
                    .map(|(k, v)| (k.as_str().to_string(), value_to_json(v)))
                    .collect()
            })
            .unwrap_or_default();
        let (body, body_base64) = match std::str::from_utf8(&delivery.data) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (None, Some(STANDARD.encode(&delivery.data))),
        };
        Self {
            routing_key: delivery.routing_key.as_str().to_string(),
            properties: ArchivedProperties {
                content_type: text(p.content_type()),
                content_encoding: text(p.content_encoding()),
                delivery_mode: *p.delivery_mode(),
                priority: *p.priority(),
                correlation_id: text(p.correlation_id()),
                reply_to: text(p.reply_to()),
                expiration: text(p.expiration()),
                message_id: text(p.message_id()),
                timestamp: *p.timestamp(),
                kind: text(p.kind()),
                user_id: text(p.user_id()),
                app_id: text(p.app_id()),
                cluster_id: text(p.cluster_id()),
            },
            headers,
            body,
            body_base64,
            fingerprint: DeadJob::from_delivery(delivery).fingerprint,
        }
    }

    /// Parses one archive line and rebuilds the message, checking that it has
    /// the fingerprint it was exported with.
    pub fn parse(line: &str) -> Result<Restored, String> {
        let archived: Archived =
            serde_json::from_str(line).map_err(|e| format!("not an exported dead job: {e}"))?;
        archived.restore()
    }

    fn restore(self) -> Result<Restored, String> {
        let body = match (&self.body, &self.body_base64) {
            (Some(text), None) => text.as_bytes().to_vec(),
            (None, Some(b64)) => STANDARD
                .decode(b64)
                .map_err(|e| format!("body_base64 is not base64: {e}"))?,
            _ => return Err("give exactly one of `body` and `body_base64`".into()),
        };
        let short = |what: &str, s: &Option<String>| -> Result<Option<ShortString>, String> {
            s.as_ref()
                .map(|s| {
                    ShortString::try_new(s.as_str())
                        .map_err(|_| format!("{what} is longer than 255 bytes"))
                })
                .transpose()
        };
        let p = &self.properties;
        let mut headers = FieldTable::default();
        for (key, value) in &self.headers {
            let name = ShortString::try_new(key.as_str())
                .map_err(|_| "a header name is longer than 255 bytes".to_string())?;
            let value = value_from_json(value).map_err(|e| format!("header `{key}`: {e}"))?;
            headers.insert(name, value);
        }
        let mut props = BasicProperties::default().with_headers(headers);
        let set = [
            ("content_type", &p.content_type),
            ("content_encoding", &p.content_encoding),
            ("correlation_id", &p.correlation_id),
            ("reply_to", &p.reply_to),
            ("expiration", &p.expiration),
            ("message_id", &p.message_id),
            ("type", &p.kind),
            ("user_id", &p.user_id),
            ("app_id", &p.app_id),
            ("cluster_id", &p.cluster_id),
        ];
        for (what, value) in set {
            if let Some(v) = short(what, value)? {
                props = match what {
                    "content_type" => props.with_content_type(v),
                    "content_encoding" => props.with_content_encoding(v),
                    "correlation_id" => props.with_correlation_id(v),
                    "reply_to" => props.with_reply_to(v),
                    "expiration" => props.with_expiration(v),
                    "message_id" => props.with_message_id(v),
                    "type" => props.with_type(v),
                    "user_id" => props.with_user_id(v),
                    "app_id" => props.with_app_id(v),
                    _ => props.with_cluster_id(v),
                };
            }
        }
        if let Some(mode) = p.delivery_mode {
            props = props.with_delivery_mode(mode);
        }
        if let Some(priority) = p.priority {
            props = props.with_priority(priority);
        }
        if let Some(ts) = p.timestamp {
            props = props.with_timestamp(ts);
        }
        let routing_key = ShortString::try_new(self.routing_key.as_str())
            .map_err(|_| "routing_key is longer than 255 bytes".to_string())?;
        let restored = fingerprint(&props, routing_key.as_str(), &body);
        if restored != self.fingerprint {
            return Err(format!(
                "the job rebuilt from this line has fingerprint {restored}, not the exported {}: the line was changed",
                self.fingerprint
            ));
        }
        Ok(Restored {
            id: crate::envelope::job_id(&props, &body),
            routing_key: self.routing_key,
            properties: props,
            body,
            fingerprint: self.fingerprint,
        })
    }
}

/// A dead job rebuilt from an archive line, ready to publish.
#[derive(Debug, Clone)]
pub struct Restored {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
    pub id: Option<String>,
    pub fingerprint: String,
}

fn value_to_json(value: &AMQPValue) -> serde_json::Value {
    match value {
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => serde_json::json!({ "s": text }),
            Err(_) => serde_json::json!({ "b64": STANDARD.encode(s.as_bytes()) }),
        },
        other => serde_json::to_value(other).unwrap_or(serde_json::Value::Null),
    }
}

fn value_from_json(value: &serde_json::Value) -> Result<AMQPValue, String> {
    if let Some(text) = value.get("s").and_then(serde_json::Value::as_str) {
        return Ok(AMQPValue::LongString(LongString::from(text)));
    }
    if let Some(b64) = value.get("b64").and_then(serde_json::Value::as_str) {
        let bytes = STANDARD
            .decode(b64)
            .map_err(|e| format!("not base64: {e}"))?;
        return Ok(AMQPValue::LongString(LongString::from(bytes)));
    }
    let parsed: AMQPValue =
        serde_json::from_value(value.clone()).map_err(|e| format!("not an AMQP value: {e}"))?;
    if !short_strings_fit(&parsed) {
        return Err("holds a short string longer than 255 bytes".into());
    }
    Ok(parsed)
}

/// Every short string in `value` (table keys included) fits AMQP's 255 bytes.
fn short_strings_fit(value: &AMQPValue) -> bool {
    match value {
        AMQPValue::ShortString(s) => s.as_str().len() <= 255,
        AMQPValue::FieldArray(items) => items.as_slice().iter().all(short_strings_fit),
        AMQPValue::FieldTable(table) => table
            .inner()
            .iter()
            .all(|(k, v)| k.as_str().len() <= 255 && short_strings_fit(v)),
        _ => true,
    }
}

/// Writes every dead job `filter` matches to `out`, one JSON line each, as it
/// reads them: the DLQ is never held in memory, and nothing is removed.
pub async fn export(
    conn: &Connection,
    names: &Names,
    filter: &Filter,
    out: &mut impl Write,
) -> anyhow::Result<(usize, Coverage)> {
    let mut reader = Reader::open(conn, names).await?;
    let mut written = 0;
    let mut failed = None;
    while let Some(delivery) = reader.next().await {
        let job = DeadJob::from_delivery(&delivery);
        if !filter.matches(&job, &delivery.data) {
            continue;
        }
        let line = serde_json::to_string(&Archived::of(&delivery))?;
        if let Err(e) = writeln!(out, "{line}") {
            failed = Some(e);
            break;
        }
        written += 1;
    }
    let coverage = reader.coverage();
    reader.close(0).await;
    if let Some(e) = failed {
        anyhow::bail!("cannot write the export after {written} job(s): {e}");
    }
    out.flush()?;
    Ok((written, coverage))
}

/// Publishes every job of an export back into the DLQ, each confirmed, the
/// whole import audited. Every line is checked first: one bad line imports nothing.
pub async fn import(
    conn: &Connection,
    names: &Names,
    publisher: &Publisher,
    actor: &Actor,
    ndjson: &[u8],
) -> anyhow::Result<usize> {
    let text = std::str::from_utf8(ndjson)
        .map_err(|e| anyhow::anyhow!("the import is not UTF-8 text ({e}); nothing was imported"))?;
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match Archived::parse(line) {
            Ok(job) => jobs.push(job),
            Err(e) => errors.push(format!("line {}: {e}", n + 1)),
        }
    }
    if !errors.is_empty() {
        let more = errors.len().saturating_sub(MAX_LISTED_ERRORS);
        errors.truncate(MAX_LISTED_ERRORS);
        if more > 0 {
            errors.push(format!("and {more} more"));
        }
        anyhow::bail!("nothing was imported: {}", errors.join("; "));
    }
    let json = serde_json::json!({ "jobs": jobs.len() });
    let mut trail = Trail::start(
        conn,
        names,
        actor,
        audit::Action::Import,
        format!("{} job(s) from an export", jobs.len()),
        json,
    )
    .await?;
    let published = publish_all(publisher, names, &jobs, &mut trail).await;
    let outcome = match &published {
        Ok(n) => Outcome {
            done: *n as u64,
            ..Outcome::default()
        },
        Err((n, e)) => Outcome {
            done: *n as u64,
            error: Some(e.clone()),
            ..Outcome::default()
        },
    };
    let recorded = trail.finish(outcome).await;
    let n = published.map_err(|(n, e)| {
        anyhow::anyhow!("{n} job(s) were imported, then: {e}; the rest were not")
    })?;
    recorded.map_err(|e| {
        anyhow::anyhow!(
            "{n} job(s) were imported, but the end of the import was not recorded: {e:#}"
        )
    })?;
    Ok(n)
}

/// Publishes the jobs in batches; on a failure, how many were confirmed before it.
async fn publish_all(
    publisher: &Publisher,
    names: &Names,
    jobs: &[Restored],
    trail: &mut Trail,
) -> Result<usize, (usize, String)> {
    let dead = names.dead();
    let mut done = 0;
    for batch in jobs.chunks(BATCH) {
        let results = join_all(batch.iter().map(|job| {
            publisher.publish(&dead, &job.routing_key, &job.body, job.properties.clone())
        }))
        .await;
        for (result, job) in results.into_iter().zip(batch) {
            if let Err(e) = result {
                return Err((done, format!("publishing a job to `{dead}`: {e}")));
            }
            done += 1;
            trail
                .took(JobRef {
                    id: job.id.clone(),
                    fingerprint: job.fingerprint.clone(),
                })
                .await
                .map_err(|e| (done, format!("{e:#}")))?;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_message(body: &[u8]) -> Delivery {
        let mut headers = FieldTable::default();
        crate::envelope::set_str(&mut headers, crate::envelope::REASON, "invalid");
        headers.insert(
            "x-raw".into(),
            AMQPValue::LongString(LongString::from(vec![0xff, 0xfe, b'a'])),
        );
        headers.insert("x-n".into(), AMQPValue::LongLongInt(-3));
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(9));
        let mut nested = FieldTable::default();
        nested.insert("reason".into(), AMQPValue::LongString("expired".into()));
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(nested)].into()),
        );
        let mut delivery = Delivery::mock(
            1,
            "t.dead".into(),
            "netease.default".into(),
            false,
            body.to_vec(),
        );
        delivery.properties = BasicProperties::default()
            .with_headers(headers)
            .with_message_id("o-1".into())
            .with_timestamp(1_700_000_000)
            .with_content_type("application/json".into())
            .with_priority(3);
        delivery
    }

    #[test]
    fn an_exported_line_restores_the_same_message_and_fingerprint_even_with_bytes() {
        for body in [&br#"{"id":"o-1"}"#[..], &[0xc3, 0x28, 0x00, 0xff][..]] {
            let delivery = dead_message(body);
            let line = serde_json::to_string(&Archived::of(&delivery)).unwrap();
            assert!(
                !line.contains('\n') && !line.contains("x-delivery-count"),
                "{line}"
            );
            let restored = Archived::parse(&line).unwrap();
            assert_eq!(restored.body, body);
            assert_eq!(restored.routing_key, "netease.default");
            assert_eq!(restored.id.as_deref(), Some("o-1"));
            assert_eq!(
                restored.fingerprint,
                DeadJob::from_delivery(&delivery).fingerprint
            );
            let headers = restored.properties.headers().clone().unwrap();
            let original = delivery.properties.headers().clone().unwrap();
            for key in ["x-raw", "x-n", "x-death", crate::envelope::REASON] {
                assert_eq!(headers.inner().get(key), original.inner().get(key), "{key}");
            }
            assert_eq!(*restored.properties.priority(), Some(3));
        }
    }

    #[test]
    fn a_changed_or_malformed_line_is_refused_with_why() {
        let line = serde_json::to_string(&Archived::of(&dead_message(b"{}"))).unwrap();
        let changed = line.replace("o-1", "o-2");
        assert!(
            Archived::parse(&changed)
                .unwrap_err()
                .contains("fingerprint")
        );
        assert!(
            Archived::parse("{")
                .unwrap_err()
                .contains("not an exported dead job")
        );
        let long_key = line.replace("\"x-n\"", &format!("\"{}\"", "k".repeat(300)));
        assert!(Archived::parse(&long_key).unwrap_err().contains("255"));
        let both = line.replace(
            "\"fingerprint\"",
            "\"body_base64\":\"AA==\",\"fingerprint\"",
        );
        assert!(Archived::parse(&both).unwrap_err().contains("exactly one"));
    }
}
