//! The access log. The request path only builds a small record and hands it to a channel
//! (`try_send`: no lock, no syscall); a dedicated thread formats and writes in batches,
//! flushing whenever the channel runs dry. When the log is off nothing is built at all.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;

use super::ring::{Entry, Ring};
use crate::config::{AccessLog as Target, LogFormat};
use crate::upstream::Backend;

/// Records waiting to be written; beyond this the log drops lines rather than slow requests.
const QUEUE: usize = 64 * 1024;

/// One request, as the access log sees it.
#[derive(Debug)]
pub struct AccessRecord {
    pub client: SocketAddr,
    pub method: Method,
    /// As the client sent them (shared with the request's head buffer: no copy).
    pub host: Option<Bytes>,
    pub target: Bytes,
    pub status: u16,
    /// The service's name; `None` when the request matched none.
    pub service: Option<Arc<str>>,
    pub backend: Option<Arc<Backend>>,
    pub start: Instant,
    pub bytes: u64,
    /// Why the request ended as it did, when it is not a plain forward (`no_route`,
    /// `no_backend`, `client_aborted`, ...).
    pub note: Option<&'static str>,
}

/// What the writer thread receives.
// Records are nearly every message; boxing them would cost an allocation per line.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Msg {
    Record(AccessRecord, u64),
    /// Write out everything before this, then answer.
    Flush(SyncSender<()>),
    /// Write out everything, open the file again by its name (logrotate moved it), answer.
    Reopen(SyncSender<io::Result<()>>),
}

/// Handle to the access log writer; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Start a writer for `target`; `None` when the log is off. Every line also goes to
    /// `ring` (the recent lines the admin API shows).
    pub fn start(target: &Target, format: LogFormat, ring: Arc<Ring>) -> io::Result<Option<AccessLog>> {
        let sink = match open_sink(target)? {
            Some(sink) => sink,
            None => return Ok(None),
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let target = target.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, sink, format, &target, &ring))?;
        Ok(Some(AccessLog { tx, dropped: Arc::new(AtomicU64::new(0)) }))
    }

    pub fn log(&self, record: AccessRecord, duration_us: u64) {
        if self.tx.try_send(Msg::Record(record, duration_us)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Write out every line logged so far, waiting at most `wait` (at exit: the writer is a
    /// thread of its own, and the process ending would lose what it has not written).
    pub fn flush(&self, wait: Duration) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(wait);
        }
    }

    /// Open the log file again by its name, after everything logged so far is written
    /// (SIGUSR1/SIGHUP, after logrotate moved it). Stdout: nothing to do.
    pub fn reopen(&self, wait: Duration) -> io::Result<()> {
        let (ack, done) = mpsc::sync_channel(1);
        self.tx.send(Msg::Reopen(ack)).map_err(|_| io::Error::other("the access-log writer has stopped"))?;
        done.recv_timeout(wait).map_err(|_| io::Error::other("the access-log writer did not answer"))?
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn open_sink(target: &Target) -> io::Result<Option<Box<dyn Write + Send>>> {
    Ok(match target {
        Target::Off => None,
        Target::Stdout => Some(Box::new(io::stdout())),
        Target::File(path) => Some(Box::new(OpenOptions::new().create(true).append(true).open(path)?)),
    })
}

fn write_loop(rx: Receiver<Msg>, sink: Box<dyn Write + Send>, format: LogFormat, target: &Target, ring: &Ring) {
    let mut out = io::BufWriter::with_capacity(64 * 1024, sink);
    let mut line = String::with_capacity(256);
    let mut json = String::with_capacity(256);
    // Block for the first message of a batch, then drain without blocking, then flush.
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(record, us) => {
                    line.clear();
                    format_record(&mut line, &record, us, format);
                    if out.write_all(line.as_bytes()).is_err() {
                        return;
                    }
                    if ring.capacity() > 0 {
                        let json = if format == LogFormat::Json {
                            line.trim_end().to_string()
                        } else {
                            json.clear();
                            format_record(&mut json, &record, us, LogFormat::Json);
                            json.trim_end().to_string()
                        };
                        ring.push(Entry { status: record.status, service: record.service.clone(), json });
                    }
                }
                Msg::Flush(ack) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
                Msg::Reopen(ack) => {
                    let _ = out.flush();
                    let reopened = match open_sink(target) {
                        Ok(Some(sink)) if matches!(target, Target::File(_)) => {
                            out = io::BufWriter::with_capacity(64 * 1024, sink);
                            Ok(())
                        }
                        Ok(_) => Ok(()),
                        // Keep writing to the old file rather than lose lines.
                        Err(e) => Err(e),
                    };
                    let _ = ack.send(reopened);
                }
            }
            match rx.try_recv() {
                Ok(m) => next = Some(m),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

fn format_record(out: &mut String, r: &AccessRecord, us: u64, format: LogFormat) {
    let host = r.host.as_ref().and_then(|h| std::str::from_utf8(h).ok()).unwrap_or("-");
    let path = std::str::from_utf8(&r.target).unwrap_or("-");
    let backend = r.backend.as_ref().map_or("-", |b| b.name.as_str());
    let ms = us as f64 / 1000.0;
    match format {
        LogFormat::Text => {
            super::time::write_now(out);
            let _ = write!(
                out,
                " {} {} {} {} {} {} {:.3}ms {}B",
                r.client.ip(),
                r.method,
                host,
                path,
                r.status,
                backend,
                ms,
                r.bytes
            );
            if let Some(note) = r.note {
                let _ = write!(out, " {note}");
            }
        }
        LogFormat::Json => {
            out.push_str("{\"time\":\"");
            super::time::write_now(out);
            let _ = write!(out, "\",\"client\":\"{}\",\"method\":", r.client.ip());
            json_str(out, r.method.as_str());
            out.push_str(",\"host\":");
            json_str(out, host);
            out.push_str(",\"path\":");
            json_str(out, path);
            let _ = write!(out, ",\"status\":{},\"service\":", r.status);
            json_str(out, r.service.as_deref().unwrap_or("-"));
            out.push_str(",\"backend\":");
            json_str(out, backend);
            let _ = write!(out, ",\"duration_ms\":{ms:.3},\"bytes\":{}", r.bytes);
            if let Some(note) = r.note {
                let _ = write!(out, ",\"note\":\"{note}\"");
            }
            out.push('}');
        }
    }
    out.push('\n');
}

/// Append `s` as a JSON string literal.
pub(super) fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AccessRecord {
        AccessRecord {
            client: "127.0.0.1:5000".parse().unwrap(),
            method: Method::GET,
            host: Some(Bytes::from_static(b"we\"b")),
            target: Bytes::from_static(b"/a?q=1"),
            status: 200,
            service: Some("web".into()),
            backend: None,
            start: Instant::now(),
            bytes: 3,
            note: None,
        }
    }

    #[test]
    fn text_line() {
        let mut s = String::new();
        format_record(&mut s, &record(), 1500, LogFormat::Text);
        assert!(s.ends_with(" 127.0.0.1 GET we\"b /a?q=1 200 - 1.500ms 3B\n"), "{s}");
    }

    #[test]
    fn json_line_escapes() {
        let mut s = String::new();
        format_record(&mut s, &record(), 1500, LogFormat::Json);
        assert!(s.contains(r#""host":"we\"b""#), "{s}");
        assert!(s.contains(r#""status":200,"service":"web""#), "{s}");
    }
}
