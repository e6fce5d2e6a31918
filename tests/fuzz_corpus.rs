//! The committed fuzz corpus (fuzz/corpus/TARGET/), replayed through the same checks the
//! fuzz targets run (`velocity::http1::fuzzing`), so that CI's `cargo test` keeps every input
//! that once found a bug, or reached new code, passing. The fuzzers themselves: bench/fuzz.sh.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            std::panic::resume_unwind(Box::new(format!("{}: {panic:?}", path.display())));
        }
        inputs += 1;
    }
    assert!(inputs > 0, "no corpus in {}", dir.display());
}

#[test]
fn request_head_corpus() {
    replay("request_head", velocity::http1::fuzzing::request_head);
}

#[test]
fn response_head_corpus() {
    replay("response_head", velocity::http1::fuzzing::response_head);
}

#[test]
fn chunked_corpus() {
    replay("chunked", velocity::http1::fuzzing::chunked);
}
