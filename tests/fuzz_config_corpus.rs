//! The config fuzz targets' corpus (fuzz/corpus/), replayed through the same functions the
//! targets call, so every `cargo test` keeps what fuzzing found. Each input must not panic.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        // A panic names the input, so it can be run alone with `cargo fuzz run TARGET FILE`.
        if let Err(panic) = std::panic::catch_unwind(|| run(&bytes)) {
            panic!("{}: {panic:?}", path.display());
        }
        inputs += 1;
    }
    assert!(inputs >= 5, "only {inputs} inputs in {}", dir.display());
}

#[test]
fn config_load_corpus() {
    replay("config_load", velocity::config::fuzzing::config_load);
}

#[test]
fn legacy_load_corpus() {
    replay("legacy_load", velocity::config::fuzzing::legacy_load);
}
