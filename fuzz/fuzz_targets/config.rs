//! The configuration file: never a panic, and a file that is accepted
//! passes its own validation again when written back out.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &str| {
    let path = std::path::Path::new("fuzz.toml");
    if let Ok(cfg) = allowlist::config::Config::parse(data, path) {
        let text = toml::to_string(&cfg).expect("a parsed config serializes");
        assert!(allowlist::config::Config::parse(&text, path).is_ok(), "{text}");
    }
});
