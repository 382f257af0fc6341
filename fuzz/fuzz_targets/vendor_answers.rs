//! Any HTTP status and body as a vendor's answer: every classifier gives an
//! answer without panicking, and an OpenIM token lifetime fits an `Instant`.
//! Input: two bytes of status (big-endian, folded into 100-999), then the body.

#![no_main]

use herald::vendor::{netease, openim, tencent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    // The HTTP client only hands over statuses of three digits.
    let status = 100 + u16::from_be_bytes(*status) % 900;
    let status = reqwest::StatusCode::from_u16(status).expect("100-999 is a status");
    // As reqwest's `text()` does: invalid UTF-8 is replaced, not refused.
    let body = String::from_utf8_lossy(body);
    let _ = netease::classify_reply(status, &body);
    let _ = tencent::classify_reply(status, &body);
    if let Ok(reply) = openim::parse(status, &body) {
        let _ = openim::classify(reply.err_code);
        let _ = openim::is_token_error(reply.err_code);
        if let Ok((_, refresh_in)) = openim::admin_token(reply) {
            assert!(std::time::Instant::now().checked_add(refresh_in).is_some());
        }
    }
});
