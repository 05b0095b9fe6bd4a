//! Admin API request bodies: never a panic, and a body with a field the
//! type does not have is refused (a misspelt field must not change what a
//! request means).
#![no_main]
use allowlist::api;
use libfuzzer_sys::fuzz_target;

fn check<T: serde::de::DeserializeOwned + serde::Serialize>(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        // Whatever was accepted round-trips to a body that is accepted too.
        let again = serde_json::to_vec(&v).unwrap();
        assert!(serde_json::from_slice::<T>(&again).is_ok());
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(data) {
            let known = serde_json::to_value(&v).unwrap();
            for k in m.keys() {
                assert!(known.get(k).is_some(), "unknown field {k:?} accepted");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    match data.first().map(|b| b % 14) {
        Some(0) => check::<api::NewKey>(&data[1..]),
        Some(1) => check::<api::AddDrop>(&data[1..]),
        Some(2) => check::<api::AllowEntry>(&data[1..]),
        Some(3) => check::<api::Deny>(&data[1..]),
        Some(4) => check::<api::SetMode>(&data[1..]),
        Some(5) => check::<api::RotateKey>(&data[1..]),
        Some(6) => check::<api::NewAccount>(&data[1..]),
        Some(7) => check::<api::NewToken>(&data[1..]),
        Some(8) => check::<api::Authorize>(&data[1..]),
        Some(9) => check::<api::Enforce>(&data[1..]),
        Some(10) => check::<api::ImportEntries>(&data[1..]),
        Some(11) => check::<api::CheckQuery>(&data[1..]),
        Some(12) => check::<api::ImportDrops>(&data[1..]),
        Some(_) => check::<api::CidrQuery>(&data[1..]),
        None => {}
    }
});
