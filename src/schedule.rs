//! Publishing a job's copy to a retry tier or to the DLQ.
//!
//! The lane (after a failed attempt) and the Tencent callback (after a late
//! failure) both end a job's attempt the same way: a confirmed copy with
//! herald's failure headers, to the retry exchange or the dead exchange. One
//! function does it, so the headers and the destination cannot drift apart.

use lapin::BasicProperties;

use crate::broker::{PublishError, Publisher};
use crate::envelope::{Failure, copy_with, frame};
pub use crate::outcome::Destination;
use crate::topology::{Names, tier_name};

/// Publishes `body` to `destination` with `failure`'s headers on a copy of
/// `original`'s properties, and waits for the broker's confirm. A copy whose
/// headers would not fit in one frame leaves the producer's biggest out
/// ([`frame::fit`]): herald's own say why it was made.
pub async fn schedule(
    publisher: &Publisher,
    names: &Names,
    destination: Destination,
    routing_key: &str,
    body: &[u8],
    original: &BasicProperties,
    failure: &Failure<'_>,
) -> Result<(), PublishError> {
    let (exchange, props) = match destination {
        Destination::Retry(delay) => (
            names.retry_exchange(),
            copy_with(original, failure.retry_headers(&tier_name(delay))),
        ),
        Destination::Dead(reason) => (
            names.dead(),
            copy_with(original, failure.dead_headers(reason, routing_key)),
        ),
    };
    let props = frame::fit(props, publisher.frame_max());
    publisher.publish(&exchange, routing_key, body, props).await
}
