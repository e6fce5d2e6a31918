//! Traffic policies applied around the balancer: the per-service request queue.

pub mod queue;

pub use queue::{Queue, QueueRejection, Ticket};
