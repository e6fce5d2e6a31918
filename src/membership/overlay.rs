//! The overlay: every run-time change to the config file's services, as data, and the file
//! that keeps it across restarts (`admin.state_file`).
//!
//! It holds outcomes rather than a history of calls: a backend's entry says whether the
//! overlay added or removed it and what weight or state it set. Keeping one entry per backend
//! keeps the file small and a change easy to undo (`DELETE /api/v1/overlay`).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::upstream::AdminState;

/// The version of the state file's format, written in it.
const FORMAT: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    #[serde(default = "format")]
    pub version: u32,
    /// Counts the changes made to the overlay (by any instance of a cluster): the higher
    /// revision wins when two instances' overlays differ.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revision: u64,
    /// Whole services added at run time, as posted (the file's schema, in JSON).
    #[serde(default)]
    pub services: Vec<Value>,
    /// Services of the file removed at run time.
    #[serde(default)]
    pub removed_services: Vec<String>,
    /// Per-backend changes, one entry per (service, address).
    #[serde(default)]
    pub backends: Vec<BackendEdit>,
}

fn format() -> u32 {
    FORMAT
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEdit {
    pub service: String,
    /// As given when the change was made.
    pub address: String,
    /// Not in the file: the overlay adds it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub added: bool,
    /// In the file: the overlay removes it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub removed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Only `disabled` is kept: a drain ends in removal, and `active` is the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AdminState>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Overlay {
    pub fn empty() -> Overlay {
        Overlay { version: FORMAT, ..Overlay::default() }
    }

    /// The same changes, whatever the revision.
    pub fn same_changes(&self, other: &Overlay) -> bool {
        self.services == other.services
            && self.removed_services == other.removed_services
            && self.backends == other.backends
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.removed_services.is_empty() && self.backends.is_empty()
    }

    /// The entry for (service, address), if there is one.
    pub fn edit_mut(&mut self, service: &str, address: &str) -> Option<&mut BackendEdit> {
        self.backends.iter_mut().find(|e| e.service == service && same_address(&e.address, address))
    }

    /// The entry for (service, address), created empty when missing.
    pub fn edit(&mut self, service: &str, address: &str) -> &mut BackendEdit {
        let i = match self.backends.iter().position(|e| e.service == service && same_address(&e.address, address)) {
            Some(i) => i,
            None => {
                self.backends.push(BackendEdit {
                    service: service.to_owned(),
                    address: address.to_owned(),
                    added: false,
                    removed: false,
                    weight: None,
                    state: None,
                });
                self.backends.len() - 1
            }
        };
        &mut self.backends[i]
    }

    /// Drop entries that change nothing, and every entry of `service` when given.
    pub fn tidy(&mut self, forget_service: Option<&str>) {
        self.backends.retain(|e| {
            Some(e.service.as_str()) != forget_service
                && (e.added || e.removed || e.weight.is_some() || e.state.is_some())
        });
    }
}

/// Whether two backend addresses name the same backend as written: `http://h:1/`, `h:1` and
/// `H:1` do.
pub fn same_address(a: &str, b: &str) -> bool {
    fn bare(s: &str) -> String {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_prefix("http://").unwrap_or(&s);
        s.strip_suffix('/').unwrap_or(s).to_owned()
    }
    bare(a) == bare(b)
}

/// Read the state file. `Ok(None)` when it does not exist yet.
pub fn load(path: &Path) -> Result<Option<Overlay>, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let overlay: Overlay =
        serde_json::from_slice(&text).map_err(|e| format!("{}: not a Velocity overlay: {e}", path.display()))?;
    if overlay.version != FORMAT {
        return Err(format!("{}: overlay format {} is not known (expected {FORMAT})", path.display(), overlay.version));
    }
    Ok(Some(overlay))
}

/// Replace the state file atomically: a temporary file beside it, written and synced, then
/// renamed over it, then the directory synced. A crash leaves the old overlay or the new one.
pub fn save(path: &Path, overlay: &Overlay) -> Result<(), String> {
    let fail = |what: &str, e: std::io::Error| format!("cannot write the overlay to {}: {what}: {e}", path.display());
    let text = serde_json::to_vec_pretty(overlay).map_err(|e| fail("encode", std::io::Error::other(e)))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "overlay".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.write_all(b"\n")?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("temporary file", e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail("rename", e));
    }
    // The rename is durable once the directory entry is.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_and_missing_file() {
        let dir = std::env::temp_dir().join(format!("velocity-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("overlay.json");
        let _ = std::fs::remove_file(&path);
        assert_eq!(load(&path).unwrap(), None);
        let mut o = Overlay::empty();
        o.edit("web", "127.0.0.1:9004").added = true;
        o.edit("web", "127.0.0.1:9004").weight = Some(3);
        o.edit("web", "http://127.0.0.1:9001/").state = Some(AdminState::Disabled);
        o.removed_services.push("old".into());
        save(&path, &o).unwrap();
        assert_eq!(load(&path).unwrap(), Some(o.clone()));
        assert_eq!(o.backends.len(), 2);
        std::fs::write(&path, "{\"version\": 1, \"extra\": 1}").unwrap();
        assert!(load(&path).unwrap_err().contains("not a Velocity overlay"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn addresses_compare_as_written_without_scheme_case_or_slash() {
        assert!(same_address("http://LocalHost:1/", "localhost:1"));
        assert!(!same_address("localhost:1", "127.0.0.1:1"));
    }
}
