//! Live membership: the one way the running set of services and backends changes.
//!
//! Desired state = the config file + an overlay of run-time changes. One writer (the server's
//! main loop, see `server.rs`) applies each [`Change`] in turn: merge, validate with the same
//! rules as `velocity check`, write the overlay, build the new snapshot keeping existing
//! backends, publish. Every source of change (SIGHUP and `--watch`, the admin API; later DNS,
//! Docker, an autoscaler, other instances) sends a [`Command`] through a [`Handle`]; nothing
//! else stores a snapshot.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};

pub mod desired;
pub mod overlay;
mod writer;

pub use desired::{Desired, Sourced};
pub use overlay::Overlay;
pub use writer::{Membership, DRAIN_POLL};

use crate::state::Snapshot;
use crate::upstream::AdminState;

/// Who asked for a change: logged with it, and what later sources will set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// SIGHUP, `--watch` or `POST /api/v1/reload`: the file was read again.
    Reload(&'static str),
    /// The admin API.
    Admin,
    /// A draining backend finished (or its drain timed out).
    Drain,
    /// Another instance's change, through the cluster store.
    Cluster,
    /// A discovery source or a managed service (`crate::discovery`); the change names which.
    Discovery,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Reload(why) => write!(f, "reload ({why})"),
            Source::Admin => f.write_str("admin API"),
            Source::Drain => f.write_str("drain"),
            Source::Cluster => f.write_str("cluster"),
            Source::Discovery => f.write_str("discovery"),
        }
    }
}

/// One change to the desired state. Backends are named by service and address (as written
/// in the file or given to the API).
#[derive(Debug, Clone)]
pub enum Change {
    /// Read the config file again (the overlay stays).
    Reload,
    /// A whole service, in the file's schema (JSON).
    AddService(serde_json::Value),
    RemoveService(String),
    AddBackend {
        service: String,
        address: String,
        weight: u32,
    },
    /// With `drain`, the backend takes no new requests and goes when its in-flight ones are
    /// done (or after `shutdown.drain_timeout`); without, at once.
    RemoveBackend {
        service: String,
        address: String,
        drain: bool,
    },
    SetWeight {
        service: String,
        address: String,
        weight: u32,
    },
    /// `draining` is a removal with drain; `active` also cancels a drain.
    SetState {
        service: String,
        address: String,
        state: AdminState,
    },
    /// Forget every run-time change: the file alone. Source-owned sets stay (their sources
    /// still run).
    ClearOverlay,
    /// The complete set of backends `source` (`dns:web`, `docker:web`, `managed:web`) owns in
    /// `service`: new addresses are added, vanished ones drained, re-weighted ones updated;
    /// backends of the file, the API and other sources are untouched. Not kept in the overlay
    /// (nor its state file): a source derives its set again when Velocity starts.
    SetSourced {
        service: String,
        source: String,
        /// (address `ip:port`, weight).
        backends: Vec<(String, u32)>,
    },
    /// Several changes applied as one: all of them or none.
    Batch(Vec<Change>),
    /// Take this overlay whole (another instance's, from the cluster store) when its revision
    /// is higher than ours; backends it removes drain here.
    Adopt(Overlay),
}

/// What kind of problem kept a change from being applied (nothing changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The change is malformed or the result would not pass `velocity check`.
    Invalid,
    /// It names a service or backend that does not exist.
    NotFound,
    /// It clashes with what exists (a duplicate backend, a service that exists already).
    Conflict,
    /// The change was valid but could not be carried out (the state file could not be written).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field it is about, when there is one.
    pub field: Option<String>,
    /// Every problem, for a reload (each `FILE:LINE:COLUMN: message`).
    pub details: Vec<String>,
}

impl ChangeError {
    /// The writer has stopped (Velocity is shutting down): nothing worth reporting.
    pub fn is_shutdown(&self) -> bool {
        self.kind == ErrorKind::Failed && self.message == SHUTTING_DOWN
    }

    pub fn new(kind: ErrorKind, message: impl Into<String>, field: Option<&str>) -> ChangeError {
        ChangeError { kind, message: message.into(), field: field.map(str::to_owned), details: Vec::new() }
    }
}

/// What a successful change left behind: the new view.
pub type Outcome = Arc<View>;

/// A change and where to send its result.
#[derive(Debug)]
pub struct Command {
    pub source: Source,
    pub change: Change,
    pub reply: oneshot::Sender<Result<Outcome, ChangeError>>,
}

/// What the admin API shows beyond the data plane's snapshot, published with it.
#[derive(Debug)]
pub struct View {
    /// The snapshot this view describes.
    pub snapshot: Arc<Snapshot>,
    /// The merged desired state it was built from (origins, admin states, conflicts).
    pub desired: Arc<Desired>,
    /// The overlay as kept (and written to the state file).
    pub overlay: Overlay,
}

/// How sources reach the writer, and how readers see its last result. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    view: Arc<ArcSwap<View>>,
    /// The overlay's revision after each commit, for sources that mirror the overlay elsewhere.
    revision: tokio::sync::watch::Receiver<u64>,
}

impl Handle {
    /// Apply `change` and wait for the result.
    pub async fn send(&self, source: Source, change: Change) -> Result<Outcome, ChangeError> {
        let (reply, answer) = oneshot::channel();
        let gone = || ChangeError::new(ErrorKind::Failed, SHUTTING_DOWN, None);
        self.tx.send(Command { source, change, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// The last published view (lock-free).
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// Changes whenever the overlay does (its revision); the overlay itself is in [`Handle::view`].
    pub fn overlay_revisions(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revision.clone()
    }
}

const SHUTTING_DOWN: &str = "shutting down";

/// Commands that may wait for the writer; a source beyond this waits for room.
const QUEUE: usize = 64;
