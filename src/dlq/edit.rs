//! Edit and replay one dead job: a corrected body goes to its lane as a new
//! copy linked to the original, and the original leaves the DLQ only after the
//! broker confirmed the copy.

use lapin::Connection;
use lapin::options::BasicAckOptions;

use super::{DeadJob, Reader};
use crate::audit::{self, Actor, JobRef, Outcome, Trail};
use crate::broker::Publisher;
use crate::enqueue::{Rules, check_all_against};
use crate::envelope::copy_for_edit;
use crate::topology::Names;

/// What an edit did.
#[derive(Debug, Clone)]
pub struct Edited {
    /// The dead copy that was replaced (and removed).
    pub original: DeadJob,
    /// The edited job's id and lane routing key.
    pub id: String,
    pub routing_key: String,
}

/// Checks `new_body` as `herald enqueue` does (contract, vendor field limits,
/// configured accounts; no secret needed), publishes it to its lane in place
/// of the dead copy `fingerprint` with that copy's history and
/// `x-herald-edited-from`, waits for the broker's confirm, and only then
/// removes the original. Audited as an `edit` by `actor`. An invalid body, or
/// a fingerprint not in the DLQ, changes nothing.
pub async fn edit_and_replay(
    conn: &Connection,
    names: &Names,
    publisher: &Publisher,
    actor: &Actor,
    rules: &Rules,
    fingerprint: &str,
    new_body: &[u8],
) -> anyhow::Result<Edited> {
    let checked = match check_all_against(new_body, rules) {
        Ok(mut jobs) if jobs.len() == 1 => jobs.remove(0),
        Ok(jobs) => anyhow::bail!(
            "the edited body holds {} jobs, not one; nothing was changed",
            jobs.len()
        ),
        Err(errors) => anyhow::bail!(
            "the edited job is not valid, nothing was changed: {}",
            errors.join("; ")
        ),
    };
    let filter = format!("--fingerprint {fingerprint}");
    let json = serde_json::json!({ "fingerprint": fingerprint, "new_id": checked.job.id });
    let trail = Trail::start(conn, names, actor, audit::Action::Edit, filter, json).await?;
    let result = replace(conn, names, publisher, actor, fingerprint, &checked).await;
    let outcome = match &result {
        Ok(_) => Outcome {
            done: 1,
            ..Outcome::default()
        },
        Err(e) => Outcome {
            error: Some(format!("{e:#}")),
            ..Outcome::default()
        },
    };
    let mut trail = trail;
    if let Ok(edited) = &result {
        trail
            .took(JobRef {
                id: edited.original.id.clone(),
                fingerprint: edited.original.fingerprint.clone(),
            })
            .await?;
    }
    let recorded = trail.finish(outcome).await;
    let edited = result?;
    recorded.map_err(|e| {
        anyhow::anyhow!(
            "the job was edited and replayed, but the end of the edit was not recorded: {e:#}"
        )
    })?;
    Ok(edited)
}

/// Finds the dead copy, publishes the edited job, and removes the copy once confirmed.
async fn replace(
    conn: &Connection,
    names: &Names,
    publisher: &Publisher,
    actor: &Actor,
    fingerprint: &str,
    checked: &crate::enqueue::Checked,
) -> anyhow::Result<Edited> {
    let mut reader = Reader::open(conn, names).await?;
    let found = loop {
        let Some(delivery) = reader.next().await else {
            break None;
        };
        let job = DeadJob::from_delivery(&delivery);
        if job.fingerprint == fingerprint {
            break Some((delivery, job));
        }
    };
    let Some((delivery, original)) = found else {
        let warning = reader.coverage().warning();
        reader.close(0).await;
        anyhow::bail!(
            "no dead copy with fingerprint {fingerprint} is in the DLQ (replayed, purged or dead again since it was listed?){}; nothing was changed",
            warning.map(|w| format!(" ({w})")).unwrap_or_default()
        );
    };
    let routing_key = checked.job.routing_key();
    let props = copy_for_edit(
        &delivery.properties,
        &checked.job.id,
        fingerprint,
        &actor.who,
    );
    let published = publisher
        .publish(&names.jobs(), &routing_key, &checked.body, props)
        .await;
    if let Err(e) = published {
        reader.close(0).await;
        anyhow::bail!(
            "the edited job was not confirmed by the broker ({e}); the original stays in the DLQ"
        );
    }
    let acked = delivery.acker.ack(BasicAckOptions::default()).await;
    reader.close(usize::from(acked.is_ok())).await;
    acked.map_err(|e| {
        anyhow::anyhow!(
            "the edited job was sent, but removing the original failed ({e}): it is still in the DLQ; purge it by its fingerprint"
        )
    })?;
    Ok(Edited {
        original,
        id: checked.job.id.clone(),
        routing_key,
    })
}
