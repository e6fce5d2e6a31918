#![no_main]
//! Checks in velocity::http1::fuzzing::chunked (shared with tests/fuzz_corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| velocity::http1::fuzzing::chunked(data));
