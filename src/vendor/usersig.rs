//! Tencent Cloud IM UserSig (TLSSigAPIv2), generated locally from the SDK secret key.
//!
//! `sig = base64(HMAC-SHA256(key, "TLS.identifier:…\nTLS.sdkappid:…\nTLS.time:…\nTLS.expire:…\n"))`,
//! put in a JSON document with the same fields, zlib-compressed, and base64-encoded
//! with `+ / =` replaced by `* - _`. The JSON text is written exactly as Tencent's
//! reference implementation writes it; `tests/vectors/usersig.json` holds a vector
//! made with that implementation (PyPI `tls-sig-api-v2`).

use std::io::{Read, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

/// The fields of a decoded UserSig.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claims {
    #[serde(rename = "TLS.ver")]
    pub version: String,
    #[serde(rename = "TLS.identifier")]
    pub identifier: String,
    #[serde(rename = "TLS.sdkappid")]
    pub sdk_app_id: u64,
    #[serde(rename = "TLS.expire")]
    pub expire: u64,
    #[serde(rename = "TLS.time")]
    pub time: u64,
    #[serde(rename = "TLS.sig")]
    pub sig: String,
}

fn hmac_sig(key: &str, identifier: &str, sdk_app_id: u64, time: u64, expire: u64) -> String {
    let content = format!(
        "TLS.identifier:{identifier}\nTLS.sdkappid:{sdk_app_id}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    );
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(content.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// A UserSig for `identifier`, valid `expire` seconds from `time` (unix seconds).
pub fn generate(sdk_app_id: u64, key: &str, identifier: &str, time: u64, expire: u64) -> String {
    let sig = hmac_sig(key, identifier, sdk_app_id, time, expire);
    // Same text as the reference implementation's json.dumps (key order, separators).
    let json = format!(
        r#"{{"TLS.ver": "2.0", "TLS.identifier": {}, "TLS.sdkappid": {sdk_app_id}, "TLS.expire": {expire}, "TLS.time": {time}, "TLS.sig": "{sig}"}}"#,
        serde_json::Value::String(identifier.to_string())
    );
    let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
    z.write_all(json.as_bytes()).expect("writing to memory");
    let compressed = z.finish().expect("writing to memory");
    STANDARD
        .encode(compressed)
        .replace('+', "*")
        .replace('/', "-")
        .replace('=', "_")
}

/// Decodes a UserSig without checking it.
pub fn decode(usersig: &str) -> Result<(String, Claims), String> {
    let b64 = usersig
        .replace('*', "+")
        .replace('-', "/")
        .replace('_', "=");
    let compressed = STANDARD
        .decode(b64)
        .map_err(|e| format!("UserSig is not base64: {e}"))?;
    let mut json = String::new();
    ZlibDecoder::new(compressed.as_slice())
        .read_to_string(&mut json)
        .map_err(|e| format!("UserSig is not zlib data: {e}"))?;
    let claims =
        serde_json::from_str(&json).map_err(|e| format!("UserSig JSON is malformed: {e}"))?;
    Ok((json, claims))
}

/// Checks a UserSig as the vendor does: signature, app, identifier and expiry.
pub fn verify(
    usersig: &str,
    key: &str,
    sdk_app_id: u64,
    identifier: &str,
    now: u64,
) -> Result<Claims, String> {
    let (_, claims) = decode(usersig)?;
    let expected = hmac_sig(
        key,
        &claims.identifier,
        claims.sdk_app_id,
        claims.time,
        claims.expire,
    );
    if claims.sig != expected {
        return Err("UserSig signature does not match".into());
    }
    if claims.sdk_app_id != sdk_app_id {
        return Err(format!(
            "UserSig is for SDKAppID {}, not {sdk_app_id}",
            claims.sdk_app_id
        ));
    }
    if claims.identifier != identifier {
        return Err(format!(
            "UserSig is for {}, not {identifier}",
            claims.identifier
        ));
    }
    if now > claims.time + claims.expire {
        return Err("UserSig expired".into());
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Vector {
        sdkappid: u64,
        key: String,
        identifier: String,
        time: u64,
        expire: u64,
        usersig: String,
    }

    fn vector() -> Vector {
        let text = include_str!("../../tests/vectors/usersig.json");
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn matches_tencents_reference_implementation() {
        let v = vector();
        let ours = generate(v.sdkappid, &v.key, &v.identifier, v.time, v.expire);
        let (their_json, their_claims) = decode(&v.usersig).unwrap();
        let (our_json, our_claims) = decode(&ours).unwrap();
        assert_eq!(our_json, their_json, "same JSON text, byte for byte");
        assert_eq!(our_claims, their_claims);
    }

    #[test]
    fn the_reference_usersig_verifies_and_expires() {
        let v = vector();
        let claims = verify(&v.usersig, &v.key, v.sdkappid, &v.identifier, v.time + 10).unwrap();
        assert_eq!(claims.version, "2.0");
        let err = verify(
            &v.usersig,
            &v.key,
            v.sdkappid,
            &v.identifier,
            v.time + v.expire + 1,
        )
        .unwrap_err();
        assert!(err.contains("expired"), "{err}");
        let err = verify(&v.usersig, "wrong-key", v.sdkappid, &v.identifier, v.time).unwrap_err();
        assert!(err.contains("signature"), "{err}");
        let err = verify(&v.usersig, &v.key, 1400000001, &v.identifier, v.time).unwrap_err();
        assert!(err.contains("SDKAppID"), "{err}");
    }

    #[test]
    fn round_trip() {
        let sig = generate(1400000000, "k", "admin", 1000, 60);
        let claims = verify(&sig, "k", 1400000000, "admin", 1030).unwrap();
        assert_eq!(
            (claims.time, claims.expire, claims.identifier.as_str()),
            (1000, 60, "admin")
        );
        assert!(!sig.contains(['+', '/', '=']), "URL-safe alphabet: {sig}");
    }
}
