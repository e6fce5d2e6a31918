//! What the config fuzz targets (fuzz/fuzz_targets/config_load.rs, legacy_load.rs) run on each
//! input, and what tests/fuzz_config_corpus.rs replays their corpus through: one function per
//! target, so CI runs exactly what was fuzzed. A panic here on any input is a bug.
//!
//! Offline (`Scope::Offline`): no DNS query leaves the machine however many names the fuzzer
//! makes up, and no file or socket is touched.

use std::path::Path;

use super::{legacy, parse_offline, to_yaml, validate::Scope, Config};

const FILE: &str = "fuzz.yaml";

/// Arbitrary bytes as a config file, as `velocity check` reads it. A config that loads must
/// come back equal from its own YAML (`to_yaml`), which is what `check` shows for legacy files.
pub fn config_load(bytes: &[u8]) {
    // `load` refuses a file that is not UTF-8 before parsing it.
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if let Ok(cfg) = parse_offline(Path::new(FILE), text) {
        round_trip(cfg);
    }
}

/// Arbitrary bytes as a legacy Go config, whether or not they would be recognised as one.
pub fn legacy_load(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if let Ok(cfg) = legacy::parse(Path::new(FILE), text, Scope::Offline) {
        let equivalent = cfg.legacy_equivalent.clone().unwrap_or_default();
        match parse_offline(Path::new("equivalent.yaml"), &equivalent) {
            Ok(again) => assert_eq!(again, Config { legacy_equivalent: None, ..cfg }, "{equivalent}"),
            Err(e) => panic!("the legacy file's equivalent does not load: {e:?}\n{equivalent}"),
        }
    }
}

fn round_trip(cfg: Config) {
    let yaml = to_yaml(&cfg);
    match parse_offline(Path::new("round-trip.yaml"), &yaml) {
        Ok(again) => assert_eq!(again, Config { legacy_equivalent: None, ..cfg }, "{yaml}"),
        Err(e) => panic!("to_yaml of a loaded config does not load: {e:?}\n{yaml}"),
    }
}
