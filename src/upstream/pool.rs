use std::sync::Arc;

use super::Backend;

/// The backends of one service at one moment, with their weights. Immutable: a change (reload,
/// admin re-weight) builds a new pool around the same `Arc<Backend>`s.
#[derive(Debug, Clone)]
pub struct Pool {
    pub backends: Vec<Arc<Backend>>,
    pub weights: Vec<u32>,
}

impl Pool {
    pub fn new(backends: Vec<(Arc<Backend>, u32)>) -> Pool {
        let (backends, weights) = backends.into_iter().unzip();
        Pool { backends, weights }
    }

    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }
}
