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
    check_batch_against(input, &Rules::from_config(config))
}

/// What a check knows of the deployment: the size limit and, when known, the
/// configured accounts.
#[derive(Debug, Clone)]
pub struct Rules {
    pub max_job_bytes: usize,
    /// `(vendor, name)` of every configured account; `None`: accounts are not checked.
    pub accounts: Option<Vec<(String, String)>>,
}

impl Rules {
    pub fn from_config(config: &Config) -> Self {
        Self {
            max_job_bytes: config.worker.max_job_bytes,
            accounts: Some(
                config
                    .accounts
                    .iter()
                    .map(|a| (a.vendor.clone(), a.name.clone()))
                    .collect(),
            ),
        }
    }

    /// The rules a config file states, read without validating it: no secret,
    /// no broker, nothing but `worker.max_job_bytes` and the accounts' names.
    pub fn from_config_text(text: &str) -> anyhow::Result<Self> {
        #[derive(serde::Deserialize)]
        struct Lenient {
            #[serde(default)]
            worker: Option<toml::Table>,
            #[serde(default)]
            account: Vec<toml::Table>,
        }
        // The file's own words may quote a secret: say only where it broke.
        let file: Lenient = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => {
                anyhow::anyhow!("the config file is not valid TOML (at byte {})", span.start)
            }
            None => anyhow::anyhow!("the config file is not valid TOML"),
        })?;
        let max_job_bytes = file
            .worker
            .as_ref()
            .and_then(|w| w.get("max_job_bytes"))
            .and_then(toml::Value::as_integer)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or_else(|| crate::config::WorkerConfig::default().max_job_bytes);
        let text =
            |t: &toml::Table, k: &str| t.get(k).and_then(toml::Value::as_str).map(str::to_string);
        let accounts = file
            .account
            .iter()
            .filter_map(|a| Some((text(a, "vendor")?, text(a, "name")?)))
            .collect();
        Ok(Self {
            max_job_bytes,
            accounts: Some(accounts),
        })
    }

    /// The contract and the vendors' field limits only.
    pub fn contract_only() -> Self {
        Self {
            max_job_bytes: crate::config::WorkerConfig::default().max_job_bytes,
            accounts: None,
        }
    }
}

/// [`check_batch`] against explicit rules (`herald enqueue --check`).
pub fn check_batch_against(input: &[u8], rules: &Rules) -> Batch {
    let mut batch = Batch::default();
    let stream = serde_json::Deserializer::from_slice(input).into_iter::<Box<RawValue>>();
    for (i, doc) in stream.enumerate() {
        let n = i + 1;
        match doc {
            Ok(raw) => match check_against(raw.get().as_bytes(), rules) {
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
    check_all_against(input, &Rules::from_config(config))
}

/// [`check_all`] against explicit rules.
pub fn check_all_against(input: &[u8], rules: &Rules) -> Result<Vec<Checked>, Vec<String>> {
    let batch = check_batch_against(input, rules);
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
    check_against(body, &Rules::from_config(config))
}

fn check_against(body: &[u8], rules: &Rules) -> Result<Job, String> {
    let job = Job::parse(body, rules.max_job_bytes).map_err(|e| e.0)?;
    let spec = vendor::spec(&job.vendor).map_err(|e| e.to_string())?;
    if let Some(accounts) = &rules.accounts
        && !accounts
            .iter()
            .any(|(v, n)| *v == job.vendor && *n == job.account)
    {
        let configured: Vec<_> = accounts
            .iter()
            .filter(|(v, _)| *v == job.vendor)
            .map(|(_, n)| n.as_str())
            .collect();
        return Err(format!(
            "no account `{}` is configured for vendor {} (configured: {})",
            job.account,
            job.vendor,
            if configured.is_empty() {
                "none".to_string()
            } else {
                configured.join(", ")
            }
        ));
    }
    (spec.check)(&job)?;
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
