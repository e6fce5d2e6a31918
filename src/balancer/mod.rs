//! Load-balancing algorithms, one file each, behind [`Balancer`].
//!
//! A balancer is built once per pool (at load, reload or admin change) and then only picks.
//! Picking is lock-free: each algorithm keeps its state in atomics.

mod least_connections;
mod round_robin;
mod weighted_round_robin;

use std::fmt::Debug;
use std::net::IpAddr;

use crate::config::Algorithm;
use crate::http1::RequestHead;
use crate::upstream::Pool;

pub use least_connections::LeastConnections;
pub use round_robin::RoundRobin;
pub use weighted_round_robin::WeightedRoundRobin;

/// What an algorithm may read about the request (hashing and sticky algorithms need it).
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    pub client_ip: IpAddr,
    /// Method, target, path and headers (`head.header("cookie")`), as the client sent them.
    pub head: &'a RequestHead,
}

pub trait Balancer: Send + Sync + Debug {
    /// The index in `pool` of the backend to use, among those for which `usable` is true.
    /// `None` when no usable backend is left.
    fn pick(&self, pool: &Pool, ctx: &RequestContext<'_>, usable: &dyn Fn(usize) -> bool) -> Option<usize>;
}

/// Build the balancer for a pool.
pub fn build(algorithm: Algorithm, pool: &Pool) -> Box<dyn Balancer> {
    match algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobin::default()),
        Algorithm::WeightedRoundRobin => Box::new(WeightedRoundRobin::new(&pool.weights)),
        Algorithm::LeastConnections => Box::new(LeastConnections::default()),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::{Arc, LazyLock};

    use super::RequestContext;
    use crate::http1::RequestHead;
    use crate::upstream::{Backend, Pool};

    static HEAD: LazyLock<RequestHead> = LazyLock::new(RequestHead::default);

    pub fn ctx() -> RequestContext<'static> {
        RequestContext { client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST), head: &HEAD }
    }

    pub fn pool(weights: &[u32]) -> Pool {
        Pool::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16));
                    (Backend::new(format!("b{i}"), addr, &addr.to_string()), *w)
                })
                .collect::<Vec<(Arc<Backend>, u32)>>(),
        )
    }
}
