//! Any bytes as a job body: parsing never panics, and a job that parses can be
//! routed, published and checked by every vendor, and survives a JSON round trip.

#![no_main]

use herald::job::Job;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(job) = Job::parse(data, 64 * 1024) else {
        return;
    };
    let _ = job.routing_key();
    let _ = job.data_text();
    let _ = herald::enqueue::properties(&job);
    for spec in herald::vendor::VENDORS {
        let _ = (spec.check)(&job);
    }
    // The callback and the DLQ re-serialize jobs: what herald writes, herald reads back.
    let body = serde_json::to_vec(&job).expect("a job serializes");
    let again = Job::parse(&body, usize::MAX).expect("a serialized job parses");
    assert_eq!(again, job);
});
