//! The legacy Go format loader on arbitrary bytes: `velocity::config::fuzzing::legacy_load`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| velocity::config::fuzzing::legacy_load(data));
