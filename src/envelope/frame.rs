//! A message's headers must fit in one AMQP frame: the broker splits nothing
//! but bodies, and closes the connection that sends a bigger content header
//! frame. A producer may publish headers that nearly fill the broker's
//! `frame_max`; herald's own headers on a retry or dead copy would then push
//! the copy over it, and the job would come back to the same end on every
//! redelivery. [`fit`] makes such a copy fit, saying what it left out.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::{DROPPED_HEADERS, HISTORY};

/// Bytes of a content header frame besides its properties: the frame's type
/// (1), channel (2), size (4) and end (1); the header's class (2), weight (2)
/// and body size (8).
const OVERHEAD: usize = 20;

/// The longest [`DROPPED_HEADERS`] value: names past it are counted, not listed.
const MAX_DROPPED_TEXT: usize = 1000;

/// Bytes of the content header frame that carries `properties`.
pub fn header_frame_size(properties: &BasicProperties) -> usize {
    OVERHEAD + encoded(lapin::protocol::basic::gen_properties(properties))
}

fn encoded(serialize: impl lapin::types::generation::SerializeFn<Vec<u8>>) -> usize {
    // Writing to a Vec cannot fail, whatever the length.
    cookie_factory::r#gen(serialize, Vec::new()).map_or(usize::MAX, |(_, len)| len as usize)
}

/// Bytes of one header entry within its table.
fn entry_size(key: &ShortString, value: &AMQPValue) -> usize {
    let mut one = FieldTable::default();
    one.insert(key.clone(), value.clone());
    // Less the table's own length prefix.
    encoded(lapin::types::generation::gen_field_table(&one)) - 4
}

/// `properties` unchanged if their frame fits in `frame_max`; otherwise
/// without the biggest headers, until it fits: first the producer's (any not
/// `x-herald-…`), biggest first, then herald's history. Each one dropped is
/// named with its size in [`DROPPED_HEADERS`], so a reviewer knows the copy
/// is not whole. What is left may still not fit (a tiny `frame_max`): the
/// publisher refuses it then, rather than sending it.
pub fn fit(properties: BasicProperties, frame_max: u32) -> BasicProperties {
    let max = frame_max as usize;
    if frame_max == 0 || header_frame_size(&properties) <= max {
        return properties;
    }
    let mut kept = properties
        .headers()
        .clone()
        .unwrap_or_default()
        .inner()
        .clone();
    let mut candidates: Vec<(ShortString, usize)> = kept
        .iter()
        .filter(|(key, _)| !key.as_str().starts_with("x-herald-"))
        .map(|(key, value)| (key.clone(), entry_size(key, value)))
        .collect();
    // Biggest first; herald's history last of all.
    candidates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.as_str().cmp(b.0.as_str())));
    if let Some(value) = kept.get(&ShortString::from(HISTORY)) {
        let key = ShortString::from(HISTORY);
        let size = entry_size(&key, value);
        candidates.push((key, size));
    }
    let mut dropped = Vec::new();
    let mut fitted = properties;
    for (key, size) in candidates {
        kept.remove(&key);
        dropped.push(format!("{} ({size} bytes)", key.as_str()));
        let mut headers = FieldTable::from(kept.clone());
        super::set_str(&mut headers, DROPPED_HEADERS, &dropped_text(&dropped));
        fitted = fitted.with_headers(headers);
        if header_frame_size(&fitted) <= max {
            break;
        }
    }
    fitted
}

fn dropped_text(dropped: &[String]) -> String {
    let mut text = String::new();
    for (i, name) in dropped.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        if text.len() + sep.len() + name.len() > MAX_DROPPED_TEXT {
            text.push_str(&format!("{sep}and {} more", dropped.len() - i));
            break;
        }
        text.push_str(sep);
        text.push_str(name);
    }
    text
}

#[cfg(test)]
mod tests {
    use lapin::types::LongString;

    use super::*;
    use crate::envelope::header_str;

    fn with(headers: &[(&str, usize)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (key, len) in headers {
            table.insert(
                (*key).into(),
                AMQPValue::LongString(LongString::from("v".repeat(*len))),
            );
        }
        BasicProperties::default()
            .with_message_id("job-1".into())
            .with_headers(table)
    }

    fn keys(properties: &BasicProperties) -> Vec<String> {
        let mut keys: Vec<_> = properties
            .headers()
            .as_ref()
            .map(|h| h.inner().keys().map(|k| k.to_string()).collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    #[test]
    fn the_frame_size_counts_each_field() {
        let none = BasicProperties::default();
        // Flags only: 2 bytes of properties.
        assert_eq!(header_frame_size(&none), OVERHEAD + 2);
        // One more header, a long string: its key's length and key, its
        // type, its value's length and value.
        assert_eq!(
            header_frame_size(&with(&[("k", 10)])) - header_frame_size(&with(&[])),
            1 + 1 + 1 + 4 + 10
        );
    }

    #[test]
    fn headers_that_fit_are_left_alone() {
        let props = with(&[("x-note", 1000), ("x-herald-error", 100)]);
        assert_eq!(fit(props.clone(), 131_072), props);
        assert_eq!(fit(props.clone(), 0), props, "no frame_max: no limit");
    }

    #[test]
    fn the_producers_biggest_headers_go_first_and_are_named() {
        let props = with(&[
            ("x-big", 120_000),
            ("x-medium", 9_000),
            ("x-small", 10),
            ("x-herald-error", 1_000),
            (HISTORY, 5_000),
        ]);
        let fitted = fit(props, 131_072);
        assert!(header_frame_size(&fitted) <= 131_072);
        assert_eq!(
            keys(&fitted),
            [
                DROPPED_HEADERS,
                "x-herald-error",
                HISTORY,
                "x-medium",
                "x-small"
            ]
        );
        assert_eq!(
            header_str(&fitted, DROPPED_HEADERS).as_deref(),
            Some("x-big (120011 bytes)")
        );
        assert_eq!(
            fitted.message_id().as_ref().map(|m| m.as_str()),
            Some("job-1")
        );
    }

    #[test]
    fn herald_history_goes_only_after_every_producer_header() {
        let props = with(&[
            ("x-a", 3_000),
            ("x-b", 2_000),
            (HISTORY, 6_000),
            ("x-herald-reason", 20),
        ]);
        let fitted = fit(props, 4_096);
        assert!(header_frame_size(&fitted) <= 4_096);
        assert_eq!(keys(&fitted), [DROPPED_HEADERS, "x-herald-reason"]);
        assert_eq!(
            header_str(&fitted, DROPPED_HEADERS).as_deref(),
            Some("x-a (3009 bytes), x-b (2009 bytes), x-herald-history (6022 bytes)")
        );
    }

    #[test]
    fn herald_own_headers_too_big_are_left_for_the_publisher_to_refuse() {
        let props = with(&[("x-herald-error", 5_000)]);
        let fitted = fit(props, 4_096);
        assert!(header_frame_size(&fitted) > 4_096);
        assert_eq!(keys(&fitted), ["x-herald-error"]);
    }

    #[test]
    fn a_long_list_of_dropped_names_is_cut_and_counted() {
        let names: Vec<String> = (0..200).map(|i| format!("x-header-{i:03}")).collect();
        let text = dropped_text(&names);
        assert!(text.len() <= MAX_DROPPED_TEXT + 20, "{}", text.len());
        assert!(text.starts_with("x-header-000, x-header-001"));
        assert!(text.ends_with(" more"), "{text}");
    }
}
