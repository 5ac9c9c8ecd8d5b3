//! The emulator's JWT decode (`emulator/jwt.rs`), which every assertion and token sent to the
//! emulator goes through, beside the proxy's own reading of an ID token's `exp`.
#![no_main]

use std::sync::OnceLock;

use impersonate_proxy::emulator::jwt::{b64url, decode};
use impersonate_proxy::emulator::{new_service_account_key, ServiceAccountKey};
use impersonate_proxy::fuzzing::jwt_exp;
use libfuzzer_sys::fuzz_target;

/// A key made once per run: nothing the fuzzer writes can carry its signature.
fn key() -> Option<&'static ServiceAccountKey> {
    static KEY: OnceLock<Option<ServiceAccountKey>> = OnceLock::new();
    KEY.get_or_init(|| new_service_account_key("fuzz@p.iam.gserviceaccount.com", "http://t").ok())
        .as_ref()
}

fuzz_target!(|s: &str| {
    let Some(jwt) = decode(s) else {
        return;
    };
    let exp = jwt.claims.get("exp").and_then(serde_json::Value::as_u64);
    // The proxy and the emulator read the same `exp`.
    assert_eq!(jwt_exp(s), exp, "{s}");
    let _ = jwt.kid();
    if let Some(k) = key() {
        assert!(!jwt.verify_pem(&k.public_key_pem), "{s}: verified");
    }
    // Re-encoded, header and claims decode again, with the same `exp`.
    let again = format!(
        "{}.{}.",
        b64url(jwt.header.to_string().as_bytes()),
        b64url(jwt.claims.to_string().as_bytes())
    );
    let Some(j2) = decode(&again) else {
        panic!("{s}: re-encoded as {again}, not decoded");
    };
    assert_eq!(
        j2.claims.get("exp").and_then(serde_json::Value::as_u64),
        exp,
        "{s}"
    );
});
