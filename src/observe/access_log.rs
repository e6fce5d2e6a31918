//! The access log. The request path only builds a small record and hands it to a channel
//! (no lock, no syscall); a dedicated thread formats and writes in batches, flushing whenever
//! the channel runs dry. When the log is off nothing is built at all.
//!
//! What waits in the channel is bounded in bytes, not lines: when stdout or the disk stalls
//! the writer blocks, lines beyond [`MAX_QUEUED_BYTES`] are dropped and counted
//! ([`AccessLog::dropped`]), and requests never wait for the log. A queued record holds its
//! own copy of the host and target (one small allocation), so it does not keep the request's
//! read buffer alive.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use tracing::warn;

use super::ring::{Entry, Ring};
use crate::config::{AccessLog as Target, LogFormat};
use crate::upstream::Backend;

/// Bytes of records waiting to be written (about 40,000 ordinary lines, a second or more of
/// heavy traffic); beyond this the log drops lines rather than slow requests or grow.
pub const MAX_QUEUED_BYTES: usize = 8 << 20;
/// Slots of the channel, allocated (and touched) up front: a cap on lines only when they are
/// tiny; the byte bound is the one that matters.
const SLOTS: usize = 16 * 1024;

/// One request, as the access log sees it.
#[derive(Debug)]
pub struct AccessRecord {
    pub client: SocketAddr,
    pub method: Method,
    /// As the client sent them (shared with the request's head buffer; the log copies them
    /// when it queues the record).
    pub host: Option<Bytes>,
    pub target: Bytes,
    pub status: u16,
    /// The service's name; `None` when the request matched none.
    pub service: Option<Arc<str>>,
    pub backend: Option<Arc<Backend>>,
    pub start: Instant,
    pub bytes: u64,
    /// Bytes from the client, for tunnels (WebSocket, TCP mode) only: an HTTP request's line
    /// keeps its one figure, the response body.
    pub bytes_in: Option<u64>,
    /// Why the request ended as it did, when it is not a plain forward (`no_route`,
    /// `no_backend`, `client_aborted`, ...).
    pub note: Option<&'static str>,
}

/// What the writer thread receives.
// Records are nearly every message; boxing them would cost an allocation per line.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Msg {
    Record(Queued),
    /// Write out everything before this, then answer.
    Flush(SyncSender<()>),
    /// Write out everything, open the file again by its name (logrotate moved it), answer.
    Reopen(SyncSender<io::Result<()>>),
}

/// A record on its way to the writer.
#[derive(Debug)]
struct Queued {
    /// Without its host and target: those are copied into `text`.
    record: AccessRecord,
    /// The target, then the host.
    text: Box<[u8]>,
    target_len: usize,
    has_host: bool,
    duration_us: u64,
    /// What it counts against [`MAX_QUEUED_BYTES`].
    cost: usize,
}

/// Handle to the access log writer; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    queue: Arc<Queue>,
}

/// What the request path and the writer share.
#[derive(Debug, Default)]
struct Queue {
    /// Bytes of the records sent and not yet written (`Queued::cost`).
    bytes: AtomicUsize,
    dropped: AtomicU64,
    /// Lines are being dropped: set by the first drop (which logs it), cleared by the writer
    /// when it has caught up (which logs that).
    dropping: AtomicBool,
    /// `dropped` when the current episode began, for the count in the caught-up line.
    dropped_before: AtomicU64,
    /// Warn when dropping starts. Not when the access log is stdout: the process log goes
    /// there too, and a warning into a stalled stdout would block the request's thread; the
    /// caught-up line reports those drops.
    warn_on_drop: bool,
}

impl AccessLog {
    /// Start a writer for `target`; `None` when the log is off. Every line also goes to
    /// `ring` (the recent lines the admin API shows).
    pub fn start(target: &Target, format: LogFormat, ring: Arc<Ring>) -> io::Result<Option<AccessLog>> {
        let sink = match open_sink(target)? {
            Some(sink) => sink,
            None => return Ok(None),
        };
        let (tx, rx) = mpsc::sync_channel(SLOTS);
        let queue = Arc::new(Queue { warn_on_drop: !matches!(target, Target::Stdout), ..Queue::default() });
        let shared = queue.clone();
        let target = target.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, sink, format, &shared, &target, &ring))?;
        Ok(Some(AccessLog { tx, queue }))
    }

    pub fn log(&self, mut record: AccessRecord, duration_us: u64) {
        let q = &self.queue;
        let host_len = record.host.as_ref().map_or(0, |h| h.len());
        let cost = std::mem::size_of::<Msg>() + record.target.len() + host_len;
        if q.bytes.fetch_add(cost, Ordering::Relaxed) + cost > MAX_QUEUED_BYTES {
            q.bytes.fetch_sub(cost, Ordering::Relaxed);
            self.note_drop();
            return;
        }
        // Shared with the request's read buffer, host and target would pin all of it while
        // queued: copy them (one allocation) and let go of the buffer.
        let mut text = Vec::with_capacity(record.target.len() + host_len);
        text.extend_from_slice(&record.target);
        let has_host = match record.host.take() {
            Some(h) => {
                text.extend_from_slice(&h);
                true
            }
            None => false,
        };
        let target_len = std::mem::take(&mut record.target).len();
        let queued = Queued { record, text: text.into_boxed_slice(), target_len, has_host, duration_us, cost };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(Msg::Record(queued)) {
            // Out of slots, or the writer is gone (its output failed).
            q.bytes.fetch_sub(cost, Ordering::Relaxed);
            self.note_drop();
        }
    }

    fn note_drop(&self) {
        let q = &self.queue;
        let before = q.dropped.fetch_add(1, Ordering::Relaxed);
        if !q.dropping.swap(true, Ordering::Relaxed) {
            q.dropped_before.store(before, Ordering::Relaxed);
            if q.warn_on_drop {
                warn!(
                    queued_bytes = MAX_QUEUED_BYTES,
                    "access log: the writer is not keeping up (output stalled): dropping lines until it catches up"
                );
            }
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

    /// Lines dropped because the writer could not keep up (or its output failed).
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Bytes of lines waiting to be written (at most [`MAX_QUEUED_BYTES`]).
    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes.load(Ordering::Relaxed)
    }
}

fn open_sink(target: &Target) -> io::Result<Option<Box<dyn Write + Send>>> {
    Ok(match target {
        Target::Off => None,
        Target::Stdout => Some(Box::new(io::stdout())),
        Target::File(path) => Some(Box::new(OpenOptions::new().create(true).append(true).open(path)?)),
    })
}

fn write_loop(
    rx: Receiver<Msg>,
    sink: Box<dyn Write + Send>,
    format: LogFormat,
    queue: &Queue,
    target: &Target,
    ring: &Ring,
) {
    let mut out = io::BufWriter::with_capacity(64 * 1024, sink);
    let mut line = String::with_capacity(256);
    let mut json = String::with_capacity(256);
    // Block for the first message of a batch, then drain without blocking, then flush.
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(q) => {
                    line.clear();
                    let (target, host) = q.text.split_at(q.target_len);
                    let host = q.has_host.then_some(host);
                    format_record(&mut line, &q.record, host, target, q.duration_us, format);
                    let written = out.write_all(line.as_bytes());
                    queue.bytes.fetch_sub(q.cost, Ordering::Relaxed);
                    if let Err(e) = written {
                        // Every later line is counted as dropped by `log`.
                        warn!(error = %e, "access log: cannot write, the access log stops here");
                        return;
                    }
                    if ring.capacity() > 0 {
                        let json = if format == LogFormat::Json {
                            line.trim_end().to_string()
                        } else {
                            json.clear();
                            format_record(&mut json, &q.record, host, target, q.duration_us, LogFormat::Json);
                            json.trim_end().to_string()
                        };
                        ring.push(Entry { status: q.record.status, service: q.record.service.clone(), json });
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
        if queue.dropping.load(Ordering::Relaxed) && queue.bytes.load(Ordering::Relaxed) < MAX_QUEUED_BYTES / 2 {
            queue.dropping.store(false, Ordering::Relaxed);
            let dropped = queue.dropped.load(Ordering::Relaxed);
            let episode = dropped - queue.dropped_before.load(Ordering::Relaxed);
            warn!(
                dropped = episode,
                dropped_total = dropped,
                "access log: caught up after its output stalled; lines were dropped meanwhile"
            );
        }
    }
    let _ = out.flush();
}

/// A status as logged: `-` for 0 (no answer reached the client, as for a request cut at
/// shutdown).
struct Status(u16);

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => f.write_str("-"),
            n => write!(f, "{n}"),
        }
    }
}

/// One line for `r`, whose host and target are given apart (see [`Queued`]).
fn format_record(out: &mut String, r: &AccessRecord, host: Option<&[u8]>, target: &[u8], us: u64, format: LogFormat) {
    let host = host.and_then(|h| std::str::from_utf8(h).ok()).unwrap_or("-");
    let path = std::str::from_utf8(target).unwrap_or("-");
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
                Status(r.status),
                backend,
                ms,
                r.bytes
            );
            if let Some(n) = r.bytes_in {
                let _ = write!(out, " in:{n}B");
            }
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
            if r.status == 0 {
                out.push_str(",\"status\":null,\"service\":");
            } else {
                let _ = write!(out, ",\"status\":{},\"service\":", r.status);
            }
            json_str(out, r.service.as_deref().unwrap_or("-"));
            out.push_str(",\"backend\":");
            json_str(out, backend);
            let _ = write!(out, ",\"duration_ms\":{ms:.3},\"bytes\":{}", r.bytes);
            if let Some(n) = r.bytes_in {
                let _ = write!(out, ",\"bytes_in\":{n}");
            }
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
            bytes_in: None,
            note: None,
        }
    }

    #[test]
    fn text_line() {
        let mut s = String::new();
        let r = record();
        format_record(&mut s, &r, r.host.as_deref(), &r.target, 1500, LogFormat::Text);
        assert!(s.ends_with(" 127.0.0.1 GET we\"b /a?q=1 200 - 1.500ms 3B\n"), "{s}");
    }

    #[test]
    fn json_line_escapes() {
        let mut s = String::new();
        let r = record();
        format_record(&mut s, &r, r.host.as_deref(), &r.target, 1500, LogFormat::Json);
        assert!(s.contains(r#""host":"we\"b""#), "{s}");
        assert!(s.contains(r#""status":200,"service":"web""#), "{s}");
    }
}
