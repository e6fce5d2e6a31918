//! `redirect_https: true` on a listener: every request gets a 308 to the same URL over https
//! (308 rather than 301: the method and body are kept, as a POST must be).

use super::Exchange;
use crate::proxy::downstream::{Downstream, Session};

impl Exchange<'_> {
    pub(super) async fn redirect_https<D: Downstream>(&mut self, c: &mut Session<D>) -> bool {
        let Some(host) = self.head.host().filter(|h| !h.is_empty()) else {
            return self.local(c, 400, &[], b"400 bad request: no Host to redirect to\n", "redirect_https").await;
        };
        // The https port is not known here: the default one (443) is meant.
        let bare = match host.strip_prefix(b"[") {
            Some(_) => host.split(|&b| b == b']').next().map_or(host, |h| &host[..h.len() + 1]),
            None => host.split(|&b| b == b':').next().unwrap_or(host),
        };
        let target = self.head.origin_target();
        let mut location = Vec::with_capacity(8 + bare.len() + target.len());
        location.extend_from_slice(b"https://");
        location.extend_from_slice(bare);
        location.extend_from_slice(target);
        self.local(c, 308, &[("location", &location)], b"", "redirect_https").await
    }
}
