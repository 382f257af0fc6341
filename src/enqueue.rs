//! `herald enqueue`: validate jobs against the contract and the config, then publish with confirms.
//!
//! Input is one JSON document, or many (NDJSON or simply concatenated). All of
//! them are checked before the first is published, so a batch with one bad job
//! publishes nothing and says which one is wrong and why.

use chrono::Utc;
use futures_util::future::try_join_all;
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde_json::value::RawValue;

use crate::broker::Publisher;
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

/// Splits input into JSON documents and checks each; every error names the document.
pub fn check_all(input: &[u8], config: &Config) -> Result<Vec<Checked>, Vec<String>> {
    let mut checked = Vec::new();
    let mut errors = Vec::new();
    let stream = serde_json::Deserializer::from_slice(input).into_iter::<Box<RawValue>>();
    for (i, doc) in stream.enumerate() {
        let n = i + 1;
        match doc {
            Ok(raw) => match check_one(raw.get().as_bytes(), config) {
                Ok(job) => checked.push(Checked {
                    job,
                    body: raw.get().as_bytes().to_vec(),
                }),
                Err(e) => errors.push(format!("job #{n}: {e}")),
            },
            Err(e) => {
                errors.push(format!("job #{n}: malformed JSON: {e}"));
                break;
            }
        }
    }
    if checked.is_empty() && errors.is_empty() {
        errors.push("no job given: pass JSON as an argument, --file, or on stdin".into());
    }
    if errors.is_empty() {
        Ok(checked)
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
    let exchange = names.jobs();
    for chunk in jobs.chunks(BATCH) {
        try_join_all(chunk.iter().map(|c| async {
            let routing_key = c.job.routing_key();
            publisher
                .publish(&exchange, &routing_key, &c.body, properties(&c.job))
                .await
        }))
        .await?;
    }
    Ok(())
}
