//! Scale from zero: a request for a managed service with no backend waits in the service's
//! queue while the autoscaler (`crate::discovery::managed`, which counts the queue's depth)
//! starts an instance, within the queue timeout and the request deadline. Reached only when a
//! managed service's pool is empty, after the normal pick found nothing: no cost otherwise.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::state::{Service, Shared};

/// How often the published snapshot is looked at while waiting (besides the wake-ups a
/// rebuild gives every waiting request).
const POLL: Duration = Duration::from_millis(20);

/// The service as published once one of its backends is usable, or `None` at the timeout
/// (or when the queue is full).
pub(super) async fn wait(state: &Shared, service: &Service, deadline: Instant) -> Option<Arc<Service>> {
    let limits = service.config.limits.queue;
    let until = deadline.min(Instant::now() + limits.timeout);
    let mut ticket = service.queue.join(limits.size).ok()?;
    loop {
        let snap = state.load();
        if let Some(s) = snap.services.iter().find(|s| s.config.name == service.config.name) {
            if s.lb.load().pool.backends.iter().any(|b| b.is_active() && b.health.selectable()) {
                // Dropping the ticket passes a wake-up it got on to the next waiting request.
                return Some(s.clone());
            }
        }
        let now = Instant::now();
        if now >= until {
            return None;
        }
        // Woken (a rebuild) or not, look again; a wake-up for a slot goes back to the front.
        if ticket.wait((now + POLL).min(until)).await.is_ok() {
            ticket.requeue_front();
        }
    }
}
