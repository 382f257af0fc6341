//! Any bytes as a `Group.CallbackSendMsgException` body: decoding and rebuilding
//! never panic, and a rebuilt job can be published and is valid under the contract.

#![no_main]

use herald::job::Job;
use herald::vendor::tencent::{CallbackVerdict, SendMsgException, rebuild};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = serde_json::from_slice::<SendMsgException>(data) else {
        return;
    };
    let Ok(CallbackVerdict::Job { job, .. }) = rebuild(&event) else {
        return;
    };
    let _ = job.routing_key();
    let _ = herald::enqueue::properties(&job);
    // The copy goes through a retry tier back to the lane, which parses it again.
    let body = serde_json::to_vec(&job).expect("a job serializes");
    Job::parse(&body, usize::MAX).expect("a rebuilt job is a valid job");
});
