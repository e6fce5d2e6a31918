//! What `run` needs of the machine beyond the file itself, checked at load so that a config
//! `velocity check` passes also starts. A port that another process holds is the one exception:
//! it may be free by the time `run` starts, and at a reload Velocity holds its own ports.

use std::fs::{self, OpenOptions};
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::path::Path;

use tokio::net::TcpSocket;

/// The access log can be opened for append, as `run` opens it (creating it when missing).
/// Nothing is left behind: a file created to find out is removed again.
pub fn access_log(path: &Path) -> Result<(), String> {
    let shown = path.display();
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(format!("access_log {shown} is a directory, not a file")),
        // A FIFO or a device (`/dev/stdout`): opening one to find out could block or act on it.
        Ok(m) if !m.is_file() => Ok(()),
        Ok(_) => OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(|e| format!("access_log {shown} cannot be opened for append: {e}")),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
            match OpenOptions::new().append(true).create_new(true).open(path) {
                Ok(_) => {
                    let _ = fs::remove_file(path);
                    Ok(())
                }
                // Created in between by someone else: it exists now, as `run` needs.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(cannot_create(path, &e)),
            }
        }
        Err(e) => Err(format!("access_log {shown}: {e}")),
    }
}

/// Why `path` cannot be created, in terms of its directory where that is the reason.
fn cannot_create(path: &Path, e: &io::Error) -> String {
    let shown = path.display();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match fs::metadata(dir) {
        Err(_) => format!("access_log {shown}: directory {} does not exist", dir.display()),
        Ok(m) if !m.is_dir() => format!("access_log {shown}: {} is not a directory", dir.display()),
        Ok(_) => format!("access_log {shown} cannot be created in {}: {e}", dir.display()),
    }
}

/// `addr` can be bound: it is an address of this machine and a port this process may use. The
/// socket is bound only (never listening), then closed.
pub fn listen(addr: SocketAddr) -> Result<(), String> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    // As `run` binds, so a port in TIME_WAIT is not mistaken for one in use.
    let _ = socket.set_reuseaddr(true);
    match socket.bind(addr) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AddrInUse => Ok(()),
        Err(e) if e.kind() == ErrorKind::AddrNotAvailable => {
            Err(format!("cannot listen on {addr}: {e}: {} is not an address of this machine", addr.ip()))
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            Err(format!("cannot listen on {addr}: {e} (ports below 1024 need root or CAP_NET_BIND_SERVICE)"))
        }
        Err(e) => Err(format!("cannot listen on {addr}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_problems_name_the_path() {
        let dir = std::env::temp_dir().join(format!("velocity-preflight-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("new.log");
        assert_eq!(access_log(&missing), Ok(()));
        assert!(!missing.exists(), "the check must not leave the file behind");
        let existing = dir.join("old.log");
        fs::write(&existing, "kept\n").unwrap();
        assert_eq!(access_log(&existing), Ok(()));
        assert_eq!(fs::read_to_string(&existing).unwrap(), "kept\n");

        let e = access_log(Path::new("/nonexistent/dir/a.log")).unwrap_err();
        assert_eq!(e, "access_log /nonexistent/dir/a.log: directory /nonexistent/dir does not exist");
        let e = access_log(&dir).unwrap_err();
        assert!(e.contains("is a directory") && e.contains(&dir.display().to_string()), "{e}");
        let e = access_log(&existing.join("a.log")).unwrap_err();
        assert!(e.ends_with("old.log is not a directory"), "{e}");
        assert_eq!(access_log(Path::new("/dev/null")), Ok(()));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn listen_addresses_must_be_local() {
        assert_eq!(listen("127.0.0.1:0".parse().unwrap()), Ok(()));
        // A port in use is not a problem of the config.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(listen(taken.local_addr().unwrap()), Ok(()));
        // TEST-NET-1 (RFC 5737): never an address of this machine.
        let e = listen("192.0.2.1:8000".parse().unwrap()).unwrap_err();
        assert!(e.contains("192.0.2.1 is not an address of this machine"), "{e}");
    }
}
