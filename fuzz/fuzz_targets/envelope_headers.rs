//! Any AMQP basic properties a publisher could send, decoded as lapin decodes
//! a delivery: herald's envelope, its copies for a retry tier, the DLQ and a
//! replay, and everything `herald dlq` shows of a dead message never panic.

#![no_main]

use chrono::{TimeZone, Utc};
use herald::envelope::{death_reason, header_str, header_u64};
use herald::dlq::{DeadJob, Filter, Stats, describe, list_table};
use herald::envelope::{self, Envelope, Failure, copy_for_replay, copy_with};
use herald::outcome::Reason;
use lapin::message::Delivery;
use lapin::protocol::basic::parse_properties;
use libfuzzer_sys::fuzz_target;

/// The headers herald reads.
const KNOWN: &[&str] = &[
    envelope::ATTEMPTS,
    envelope::FIRST_SEEN,
    envelope::LAST_ATTEMPT,
    envelope::REASON,
    envelope::VENDOR_CODE,
    envelope::ERROR,
    envelope::ROUTING_KEY,
    envelope::REPLAYED,
    envelope::HISTORY,
    envelope::EDITED_FROM,
    herald::topology::TIER_HEADER,
    "x-death",
];

fuzz_target!(|data: &[u8]| {
    let Ok((_, properties)) = parse_properties(data) else {
        return;
    };
    let now = Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap();
    let envelope = Envelope::read(&properties, now);
    let _ = envelope.next_attempt();
    for name in KNOWN {
        let _ = header_str(&properties, name);
        let _ = header_u64(&properties, name);
    }
    let _ = death_reason(&properties);

    let _ = copy_for_replay(&properties, "fuzz", "fuzz");
    let _ = envelope::copy_for_edit(&properties, "j-2", "f", "fuzz");
    let _ = envelope::history(&properties);
    let error = header_str(&properties, envelope::ERROR).unwrap_or_default();
    let failure = Failure {
        attempts: envelope.next_attempt(),
        first_seen: envelope.first_seen,
        code: Some("500"),
        error: &error,
        now,
    };
    let _ = copy_with(&properties, failure.retry_headers("1s"));

    let mut delivery = Delivery::mock(
        1,
        "herald.dead".into(),
        "netease.default".into(),
        false,
        br#"{"id":"j-1"}"#.to_vec(),
    );
    delivery.properties = properties;
    let dead = DeadJob::from_delivery(&delivery);
    let _ = copy_with(
        &delivery.properties,
        failure.dead_headers(Reason::Exhausted, &dead.routing_key),
    );
    let _ = Filter::default().matches(&dead, &delivery.data);
    let _ = herald::dlq::error_shape(&error);
    let mut stats = Stats::default();
    stats.add(&dead);
    let _ = stats.table();
    let _ = describe(&delivery);
    let _ = list_table(std::slice::from_ref(&dead));
});
