//! The console's in-memory index of the DLQ: one reader pass turned into
//! compact job summaries grouped as `dlq stats` groups them (vendor, account,
//! reason, vendor code, error shape), with arrivals over time for the charts.
//!
//! No body is kept: a summary holds what a list row shows and what the
//! group filters need (id, recipient, key, time), a few hundred bytes a job. The
//! overview and the group pages read it; a refresh or an action builds a new one.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::dlq::{Coverage, DeadJob, Filter};
use crate::outcome::Reason;

/// Bars in each group's arrivals chart.
pub const BUCKETS: usize = 24;
/// Characters of an error a summary keeps.
const ERROR_CHARS: usize = 300;
/// Jobs per group page.
pub const PER_PAGE: usize = 50;

/// One dead copy as a list row shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobSummary {
    pub id: Option<String>,
    pub fingerprint: String,
    /// The group's key ([`group_key`]).
    pub group: String,
    pub routing_key: String,
    pub recipient: Option<String>,
    pub key: Option<String>,
    pub error: String,
    pub attempts: u64,
    pub died_at: Option<DateTime<Utc>>,
}

impl JobSummary {
    pub fn of(job: &DeadJob) -> Self {
        Self {
            id: job.id.clone(),
            fingerprint: job.fingerprint.clone(),
            group: group_key(job),
            routing_key: job.routing_key.clone(),
            recipient: job.recipient.clone(),
            key: job.key.clone(),
            error: job.error.chars().take(ERROR_CHARS).collect(),
            attempts: job.attempts,
            died_at: job.died_at,
        }
    }

    /// What `/job/…` names this copy by: its id, or its fingerprint for a job without one.
    pub fn handle(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.fingerprint)
    }
}

/// One failure group of the overview.
#[derive(Debug, Clone, Serialize)]
pub struct GroupSummary {
    pub key: String,
    pub vendor: String,
    pub account: String,
    pub reason: Reason,
    pub code: Option<String>,
    /// The error fingerprint: the error with ids and numbers normalised.
    pub shape: String,
    pub count: usize,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
    /// Jobs that died in each of [`BUCKETS`] equal spans of [`Index::span`].
    pub arrivals: Vec<u32>,
    /// Positions in [`Index::jobs`], in queue order.
    #[serde(skip)]
    members: Vec<u32>,
}

impl GroupSummary {
    /// The dlq filter that selects exactly this group.
    pub fn filter(&self) -> Filter {
        Filter {
            vendor: Some(self.vendor.clone()),
            account: Some(self.account.clone()),
            reason: Some(self.reason),
            code: self.code.clone(),
            shape: Some(self.shape.clone()),
            ..Filter::default()
        }
    }
}

/// A stable name for a group: 16 hex digits over its vendor, account, reason,
/// code and shape, the same in every index built from the same DLQ.
pub fn group_key(job: &DeadJob) -> String {
    let mut sha = Sha256::new();
    for field in [
        job.vendor.as_str(),
        job.account.as_str(),
        job.reason.as_str(),
        job.code.as_deref().unwrap_or("\u{0}"),
        job.shape.as_str(),
    ] {
        sha.update((field.len() as u64).to_be_bytes());
        sha.update(field.as_bytes());
    }
    hex::encode(&sha.finalize()[..8])
}

/// The DLQ as one pass saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Index {
    pub built_at: DateTime<Utc>,
    /// How long the pass took.
    #[serde(with = "humantime_serde")]
    pub took: Duration,
    #[serde(skip)]
    pub coverage: Coverage,
    /// Biggest first.
    pub groups: Vec<GroupSummary>,
    #[serde(skip)]
    pub jobs: Vec<JobSummary>,
    /// First and last death among all jobs: the charts' time axis.
    pub span: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

/// The filters of a group page beyond the group itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuery {
    pub id: Option<String>,
    pub recipient: Option<String>,
    pub key: Option<String>,
    /// Searched in bodies, which the index does not hold: a pass answers it.
    pub text: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl JobQuery {
    /// This query within `group`, as the dlq filter a sweep uses.
    pub fn filter(&self, group: &GroupSummary) -> Filter {
        Filter {
            id: self.id.clone(),
            recipient: self.recipient.clone(),
            key: self.key.clone(),
            text: self.text.clone(),
            since: self.since,
            until: self.until,
            ..group.filter()
        }
    }

    /// Every field but `text` matches the summary, as [`Filter`] would match the job.
    pub fn matches(&self, job: &JobSummary) -> bool {
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_deref().is_none_or(|w| have.as_deref() == Some(w))
        };
        eq(&self.id, &job.id)
            && eq(&self.recipient, &job.recipient)
            && eq(&self.key, &job.key)
            && self
                .since
                .is_none_or(|t| job.died_at.is_some_and(|d| d >= t))
            && self
                .until
                .is_none_or(|t| job.died_at.is_some_and(|d| d < t))
    }
}

/// One page of jobs.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// From 1.
    pub page: usize,
    pub pages: usize,
    /// Jobs matching, on every page.
    pub total: usize,
    pub jobs: Vec<JobSummary>,
}

impl Page {
    /// Page `page` (from 1, clamped) of `jobs`.
    pub fn of<'a>(jobs: impl Iterator<Item = &'a JobSummary>, page: usize) -> Self {
        let page = page.max(1);
        let mut total = 0;
        let mut shown = Vec::new();
        let skip = (page - 1) * PER_PAGE;
        for job in jobs {
            if total >= skip && shown.len() < PER_PAGE {
                shown.push(job.clone());
            }
            total += 1;
        }
        Self {
            page,
            pages: total.div_ceil(PER_PAGE).max(1),
            total,
            jobs: shown,
        }
    }
}

impl Index {
    pub fn group(&self, key: &str) -> Option<&GroupSummary> {
        self.groups.iter().find(|g| g.key == key)
    }

    /// Jobs of `group` matching `query` (its `text` aside), in queue order.
    pub fn members<'a>(
        &'a self,
        group: &'a GroupSummary,
        query: &'a JobQuery,
    ) -> impl Iterator<Item = &'a JobSummary> + 'a {
        group
            .members
            .iter()
            .map(|&i| &self.jobs[i as usize])
            .filter(move |j| query.matches(j))
    }

    /// Dead copies the index holds of the job `handle` names (an id or a fingerprint).
    pub fn copies(&self, handle: &str) -> usize {
        self.jobs
            .iter()
            .filter(|j| j.id.as_deref() == Some(handle) || j.fingerprint == handle)
            .count()
    }

    pub fn total(&self) -> usize {
        self.jobs.len()
    }
}

/// Builds an [`Index`] one dead job at a time, as a pass reads them.
#[derive(Debug, Default)]
pub struct Builder {
    groups: Vec<GroupSummary>,
    by_key: HashMap<String, usize>,
    jobs: Vec<JobSummary>,
    /// Group position of each job.
    of_job: Vec<u32>,
}

impl Builder {
    pub fn add(&mut self, job: &DeadJob) {
        let summary = JobSummary::of(job);
        let next = self.groups.len();
        let at = *self.by_key.entry(summary.group.clone()).or_insert(next);
        if at == next {
            self.groups.push(GroupSummary {
                key: summary.group.clone(),
                vendor: job.vendor.clone(),
                account: job.account.clone(),
                reason: job.reason,
                code: job.code.clone(),
                shape: job.shape.clone(),
                count: 0,
                oldest: None,
                newest: None,
                arrivals: Vec::new(),
                members: Vec::new(),
            });
        }
        let group = &mut self.groups[at];
        group.count += 1;
        group.members.push(self.jobs.len() as u32);
        if let Some(t) = job.died_at {
            group.oldest = Some(group.oldest.map_or(t, |o| o.min(t)));
            group.newest = Some(group.newest.map_or(t, |n| n.max(t)));
        }
        self.of_job.push(at as u32);
        self.jobs.push(summary);
    }

    pub fn finish(mut self, coverage: Coverage, built_at: DateTime<Utc>, took: Duration) -> Index {
        let oldest = self.groups.iter().filter_map(|g| g.oldest).min();
        let newest = self.groups.iter().filter_map(|g| g.newest).max();
        let span = oldest.zip(newest);
        for g in &mut self.groups {
            g.arrivals = vec![0; BUCKETS];
        }
        if let Some((from, to)) = span {
            for (job, &group) in self.jobs.iter().zip(&self.of_job) {
                if let Some(t) = job.died_at {
                    self.groups[group as usize].arrivals[bucket(t, from, to)] += 1;
                }
            }
        }
        self.groups
            .sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        Index {
            built_at,
            took,
            coverage,
            groups: self.groups,
            jobs: self.jobs,
            span,
        }
    }
}

/// Which of [`BUCKETS`] equal parts of `from..=to` holds `t`.
fn bucket(t: DateTime<Utc>, from: DateTime<Utc>, to: DateTime<Utc>) -> usize {
    let width = (to - from).num_milliseconds();
    if width <= 0 {
        return BUCKETS - 1;
    }
    let offset = (t - from).num_milliseconds().clamp(0, width);
    ((offset as i128 * BUCKETS as i128 / (width as i128 + 1)) as usize).min(BUCKETS - 1)
}

#[cfg(test)]
pub(crate) mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::dlq::error_shape;

    pub(crate) fn dead(id: &str, reason: Reason, error: &str, secs: i64) -> DeadJob {
        DeadJob {
            id: Some(id.into()),
            vendor: "netease".into(),
            account: "default".into(),
            reason,
            code: None,
            error: error.into(),
            shape: error_shape(error),
            recipient: Some(format!("u-{id}")),
            key: Some("order.shipped".into()),
            attempts: 1,
            died_at: Utc.timestamp_opt(secs, 0).single(),
            routing_key: "netease.default".into(),
            fingerprint: hex::encode(Sha256::digest(id.as_bytes())),
            job_key: format!("id:{id}"),
            replay_run: None,
        }
    }

    fn index(jobs: &[DeadJob]) -> Index {
        let mut builder = Builder::default();
        for j in jobs {
            builder.add(j);
        }
        builder.finish(Coverage::default(), Utc::now(), Duration::ZERO)
    }

    #[test]
    fn invalid_jobs_with_different_errors_fall_into_groups_by_error_shape() {
        let idx = index(&[
            dead("a", Reason::Invalid, "pushcontent is 612 characters", 100),
            dead("b", Reason::Invalid, "pushcontent is 700 characters", 200),
            dead("c", Reason::Invalid, "unknown field `tto` at line 1", 300),
            dead("d", Reason::Permanent, "unknown field `tto` at line 1", 300),
        ]);
        assert_eq!(idx.groups.len(), 3);
        let big = &idx.groups[0];
        assert_eq!(
            (big.count, big.shape.as_str()),
            (2, "pushcontent is <n> characters")
        );
        assert_eq!(big.oldest.unwrap().timestamp(), 100);
        assert_eq!(big.newest.unwrap().timestamp(), 200);
        assert_eq!(big.arrivals.iter().sum::<u32>(), 2);
        assert_eq!(big.arrivals[0], 1, "the oldest job is in the first bar");
        assert_eq!(big.arrivals[BUCKETS - 1], 0);
        assert_eq!(idx.total(), 4);
        // The same group gets the same key in another index.
        let again = index(&[dead("z", Reason::Invalid, "pushcontent is 1 characters", 5)]);
        assert_eq!(again.groups[0].key, big.key);
        assert_eq!(big.key.len(), 16);
    }

    #[test]
    fn group_pages_hold_fifty_jobs_and_filters_narrow_them() {
        let jobs: Vec<DeadJob> = (0..120)
            .map(|i| dead(&format!("j{i}"), Reason::Invalid, "bad", i))
            .collect();
        let idx = index(&jobs);
        let group = &idx.groups[0];
        let all = JobQuery::default();
        let first = Page::of(idx.members(group, &all), 1);
        assert_eq!((first.total, first.pages, first.jobs.len()), (120, 3, 50));
        assert_eq!(first.jobs[0].id.as_deref(), Some("j0"));
        let last = Page::of(idx.members(group, &all), 3);
        assert_eq!(last.jobs.len(), 20);
        assert_eq!(last.jobs[0].id.as_deref(), Some("j100"));
        assert!(Page::of(idx.members(group, &all), 9).jobs.is_empty());
        let at = |s| Utc.timestamp_opt(s, 0).single();
        let window = JobQuery {
            since: at(10),
            until: at(20),
            ..JobQuery::default()
        };
        assert_eq!(Page::of(idx.members(group, &window), 1).total, 10);
        let one = JobQuery {
            recipient: Some("u-j7".into()),
            ..JobQuery::default()
        };
        let page = Page::of(idx.members(group, &one), 1);
        assert_eq!(page.jobs[0].id.as_deref(), Some("j7"));
        assert_eq!(page.total, 1);
        assert_eq!(idx.copies("j7"), 1);
        assert_eq!(idx.copies(&page.jobs[0].fingerprint), 1);
        let filter = one.filter(group);
        assert_eq!(filter.shape.as_deref(), Some("bad"));
        assert_eq!(filter.recipient.as_deref(), Some("u-j7"));
    }

    #[test]
    fn buckets_split_the_span_evenly_and_a_single_instant_fills_the_last() {
        let at = |s| Utc.timestamp_opt(s, 0).single().unwrap();
        assert_eq!(bucket(at(0), at(0), at(2400)), 0);
        assert_eq!(bucket(at(2400), at(0), at(2400)), BUCKETS - 1);
        assert_eq!(bucket(at(1200), at(0), at(2400)), 11);
        assert_eq!(bucket(at(5), at(5), at(5)), BUCKETS - 1);
    }
}
