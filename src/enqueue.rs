//! `herald enqueue`: validate jobs against the contract and the config, then publish with confirms.
//!
//! Input is one JSON document, or many (NDJSON or simply concatenated). All of
//! them are checked before the first is published, so a batch with one bad job
//! publishes nothing and says which one is wrong and why.

use chrono::Utc;
use futures_util::future::join_all;
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde_json::value::RawValue;

use crate::broker::{PublishError, Publisher};
use crate::config::Config;
use crate::job::Job;
use crate::topology::Names;
use crate::vendor;

/// Confirms awaited together when publishing a batch.
const BATCH: usize = 500;

/// A job that passed every check, with the exact bytes the producer wrote.
#[derive(Debug, Clone)]
pub struct Checked {
    pub job: Job,
    pub body: Vec<u8>,
}

/// A batch split into documents and checked: what passed, and why each other document failed.
#[derive(Debug, Default)]
pub struct Batch {
    pub checked: Vec<Checked>,
    /// `(n, why)`: document `n` (1-based) failed the checks; `why` names the field.
    pub rejected: Vec<(usize, String)>,
}

/// Splits input into JSON documents and checks each. A document that is not
/// JSON ends the split: nothing after it can be located.
pub fn check_batch(input: &[u8], config: &Config) -> Batch {
    let mut batch = Batch::default();
    let stream = serde_json::Deserializer::from_slice(input).into_iter::<Box<RawValue>>();
    for (i, doc) in stream.enumerate() {
        let n = i + 1;
        match doc {
            Ok(raw) => match check_one(raw.get().as_bytes(), config) {
                Ok(job) => batch.checked.push(Checked {
                    job,
                    body: raw.get().as_bytes().to_vec(),
                }),
                Err(e) => batch.rejected.push((n, e)),
            },
            Err(e) => {
                batch.rejected.push((n, format!("malformed JSON: {e}")));
                break;
            }
        }
    }
    batch
}

/// Splits input into JSON documents and checks each; every error names the document.
pub fn check_all(input: &[u8], config: &Config) -> Result<Vec<Checked>, Vec<String>> {
    let batch = check_batch(input, config);
    let mut errors: Vec<String> = batch
        .rejected
        .iter()
        .map(|(n, e)| format!("job #{n}: {e}"))
        .collect();
    if batch.checked.is_empty() && errors.is_empty() {
        errors.push("no job given: pass JSON as an argument, --file, or on stdin".into());
    }
    if errors.is_empty() {
        Ok(batch.checked)
    } else {
        Err(errors)
    }
}

/// Everything the worker would refuse before sending: contract, vendor, account, field limits.
pub fn check_one(body: &[u8], config: &Config) -> Result<Job, String> {
    let job = Job::parse(body, config.worker.max_job_bytes).map_err(|e| e.0)?;
    vendor::spec(&job.vendor).map_err(|e| e.to_string())?;
    let account = config.account(&job.vendor, &job.account).ok_or_else(|| {
        let configured: Vec<_> = config
            .accounts
            .iter()
            .filter(|a| a.vendor == job.vendor)
            .map(|a| a.name.as_str())
            .collect();
        format!(
            "no account `{}` is configured for vendor {} (configured: {})",
            job.account,
            job.vendor,
            if configured.is_empty() {
                "none".to_string()
            } else {
                configured.join(", ")
            }
        )
    })?;
    (vendor::spec(&account.vendor)
        .map_err(|e| e.to_string())?
        .check)(&job)?;
    Ok(job)
}

/// The properties every job is published with.
pub fn properties(job: &Job) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(job.id.as_str()))
        .with_timestamp(Utc::now().timestamp() as u64)
        .with_app_id(ShortString::from("herald-enqueue"))
}

/// Publishes checked jobs to `{p}.jobs` and waits for every confirm.
pub async fn publish(publisher: &Publisher, names: &Names, jobs: &[Checked]) -> anyhow::Result<()> {
    match publish_each(publisher, names, jobs).await.error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// What became of a batch handed to [`publish_each`].
#[derive(Debug)]
pub struct Published {
    /// One flag per job, in input order: the broker confirmed it.
    pub confirmed: Vec<bool>,
    /// The first failure; the chunks after the one it happened in were not sent.
    pub error: Option<PublishError>,
}

/// Publishes checked jobs to `{p}.jobs`, waits for every confirm, and says
/// which ones the broker confirmed, so that a caller can say exactly what to retry.
pub async fn publish_each(publisher: &Publisher, names: &Names, jobs: &[Checked]) -> Published {
    let exchange = names.jobs();
    let mut confirmed = Vec::with_capacity(jobs.len());
    let mut error = None;
    for chunk in jobs.chunks(BATCH) {
        if error.is_some() {
            confirmed.resize(jobs.len(), false);
            break;
        }
        let results = join_all(chunk.iter().map(|c| async {
            let routing_key = c.job.routing_key();
            publisher
                .publish(&exchange, &routing_key, &c.body, properties(&c.job))
                .await
        }))
        .await;
        for result in results {
            match result {
                Ok(()) => confirmed.push(true),
                Err(e) => {
                    confirmed.push(false);
                    error.get_or_insert(e);
                }
            }
        }
    }
    Published { confirmed, error }
}
