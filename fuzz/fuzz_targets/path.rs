//! Request paths: never a panic; the normal form is a fixed point with no
//! dot segment, no empty segment and no encoded separator — what the scope
//! check saw is what any upstream resolves.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &str| {
    if let Ok(Some(out)) = allowlist::policy::normalize_path(data) {
        assert!(out.starts_with('/'));
        assert_eq!(allowlist::policy::normalize_path(&out), Ok(None), "{data:?} -> {out:?}");
        assert!(!out.contains("//"));
        for seg in out.split('/') {
            assert!(seg != "." && seg != "..");
        }
        let lower = out.to_ascii_lowercase();
        assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e"));
    }
});
