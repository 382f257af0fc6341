//! Typed reads and writes of AMQP headers: the one place a header's wire
//! format is decided, for the worker, the DLQ tools and herald-bench alike.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// The raw value of header `key`.
pub fn header<'a>(properties: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&ShortString::from(key)))
}

/// Header `key` as text; a number is given as its decimal text.
pub fn header_str(properties: &BasicProperties, key: &str) -> Option<String> {
    match header(properties, key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => value_u64(other).map(|n| n.to_string()),
    }
}

/// Header `key` as a number; text that parses as one counts.
pub fn header_u64(properties: &BasicProperties, key: &str) -> Option<u64> {
    match header(properties, key)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().ok(),
        other => value_u64(other),
    }
}

fn value_u64(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

/// Sets a string header.
pub fn set_str(headers: &mut FieldTable, key: &str, value: &str) {
    headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
}

/// Sets an integer header.
pub fn set_int(headers: &mut FieldTable, key: &str, value: u64) {
    headers.insert(
        key.into(),
        AMQPValue::LongLongInt(value.min(i64::MAX as u64) as i64),
    );
}

/// The `x-death` reason the broker gave when it dead-lettered this message, if any.
pub fn death_reason(properties: &BasicProperties) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = header(properties, "x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get(&ShortString::from("reason"))? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}
