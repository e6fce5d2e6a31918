//! The overlay kept in Redis: a hash with the whole overlay (JSON) and its revision. A change
//! made here is pushed (only if its revision is higher than the store's: compare-and-set in
//! one script, which PUBLISHes the new revision); a higher revision in the store is adopted
//! through the membership writer. The pub/sub message is only a hint: the heartbeat compares
//! revisions every second, every reconnect resyncs, and so does a timer, so a lost message is
//! never a lost change. The local `state_file` stays the cache while Redis is unreachable.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{Cluster, CONTROL_TIMEOUT};
use crate::membership::{Change, Handle, Overlay, Source};

/// A full resync even when nothing announced a change.
const RESYNC: Duration = Duration::from_secs(30);

/// Write the overlay if its revision is higher than the store's, and announce it.
static PUSH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = tonumber(redis.call('HGET', KEYS[1], 'revision') or '-1')
local new = tonumber(ARGV[1])
if new > cur then
  redis.call('HSET', KEYS[1], 'revision', ARGV[1], 'overlay', ARGV[2], 'by', ARGV[3])
  redis.call('PUBLISH', ARGV[4], ARGV[1])
  return 1
end
return 0
",
    )
});

pub async fn run(cluster: Arc<Cluster>, membership: Handle, hint: Arc<Notify>, resync: Arc<Notify>) {
    let mut revisions = membership.overlay_revisions();
    let mut timer = tokio::time::interval(RESYNC);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut subscribed = false;
    loop {
        tokio::select! {
            _ = hint.notified() => {}
            _ = resync.notified() => {}
            changed = revisions.changed() => if changed.is_err() { return },
            _ = timer.tick() => {}
        }
        if !subscribed {
            // The connection manager subscribes again by itself after a reconnect.
            subscribed = cluster.store.subscribe(&cluster.keys.channel, CONTROL_TIMEOUT).await.is_ok();
        }
        if let Err(e) = sync_once(&cluster, &membership).await {
            // The heartbeat reports the store's state; this says what waits.
            tracing::debug!("cluster: overlay sync: {e}");
        }
    }
}

/// Compare the store's revision with ours, and move the newer overlay the other way.
async fn sync_once(cluster: &Cluster, membership: &Handle) -> Result<(), String> {
    for _ in 0..3 {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&cluster.keys.overlay).arg("revision").arg("overlay");
        let (revision, text): (Option<i64>, Option<String>) = cluster.store.command(&cmd, CONTROL_TIMEOUT).await?;
        let ours = membership.view().overlay.clone();
        let theirs = revision.unwrap_or(-1);
        let ours_rev = i64::try_from(ours.revision).unwrap_or(i64::MAX);
        let stored = || -> Result<Overlay, String> {
            let text = text.as_deref().ok_or("the store's overlay has a revision but no overlay")?;
            let mut overlay: Overlay =
                serde_json::from_str(text).map_err(|e| format!("the store's overlay is not readable: {e}"))?;
            overlay.revision = u64::try_from(theirs).unwrap_or(0);
            Ok(overlay)
        };
        // The same revision with other changes: two instances changed it at once, and the
        // store has the one that was shared first.
        let tie = theirs == ours_rev && theirs >= 0 && stored().is_ok_and(|o| !o.same_changes(&ours));
        if theirs > ours_rev || tie {
            let overlay = stored()?;
            membership
                .send(Source::Cluster, Change::Adopt(overlay))
                .await
                .map_err(|e| format!("adopting revision {theirs}: {}", e.message))?;
            return Ok(());
        }
        // An overlay the store has never seen is pushed even at revision 0 (`-1` there).
        if ours_rev > theirs {
            let json = serde_json::to_string(&ours).map_err(|e| e.to_string())?;
            let args: [&dyn super::store::ToRedisArgsDyn; 4] =
                [&ours.revision, &json, &cluster.instance_id, &cluster.keys.channel];
            let written: i64 = cluster.store.script(&PUSH, &[&cluster.keys.overlay], &args, CONTROL_TIMEOUT).await?;
            if written == 1 {
                info!("cluster: overlay revision {} shared", ours.revision);
                return Ok(());
            }
            // Another instance wrote a revision as high as ours first: it wins; look again.
            warn!(
                "cluster: overlay revision {} was overtaken by another instance's change; taking the store's",
                ours.revision
            );
            continue;
        }
        return Ok(());
    }
    Ok(())
}
