//! The event log: health transitions, ejections, drops, reloads, listeners; everything that is
//! not one line per request. It goes through `tracing` to `event_log` (stderr by default,
//! stdout, or a file that SIGUSR1/SIGHUP reopen), as text or JSON after `log_format`, with the
//! access log's timestamp format.
//!
//! The subscriber is installed once at start (before the config is read: problems with it go
//! to stderr), and the destination and format are switched when a config is applied.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::access_log::json_str;
use crate::config::{EventLog, LogFormat};

enum Target {
    Stderr,
    Stdout,
    File { path: PathBuf, file: File },
}

struct Sink {
    target: Mutex<Target>,
    json: AtomicBool,
}

fn sink() -> &'static Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    SINK.get_or_init(|| Sink { target: Mutex::new(Target::Stderr), json: AtomicBool::new(false) })
}

/// Install the event log: stderr and text until [`configure`] says otherwise. `RUST_LOG`
/// overrides the default `info` level.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .event_format(EventFormat)
        .with_writer(|| EventWriter)
        .try_init();
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Send events to `target` in `format` from now on. A file that cannot be opened leaves the
/// current destination in place.
pub fn configure(target: &EventLog, format: LogFormat) -> io::Result<()> {
    let next = match target {
        EventLog::Stderr => Target::Stderr,
        EventLog::Stdout => Target::Stdout,
        EventLog::File(path) => {
            let mut current = sink().target.lock().unwrap_or_else(|p| p.into_inner());
            if let Target::File { path: open_path, .. } = &*current {
                if open_path == path {
                    sink().json.store(format == LogFormat::Json, Ordering::Relaxed);
                    return Ok(());
                }
            }
            let file = open(path)?;
            *current = Target::File { path: path.clone(), file };
            sink().json.store(format == LogFormat::Json, Ordering::Relaxed);
            return Ok(());
        }
    };
    *sink().target.lock().unwrap_or_else(|p| p.into_inner()) = next;
    sink().json.store(format == LogFormat::Json, Ordering::Relaxed);
    Ok(())
}

/// Open the event log file again by its name (after logrotate moved it). No-op for
/// stderr/stdout.
pub fn reopen() -> io::Result<()> {
    let mut current = sink().target.lock().unwrap_or_else(|p| p.into_inner());
    if let Target::File { path, file } = &mut *current {
        let _ = file.flush();
        *file = open(path)?;
    }
    Ok(())
}

/// Writes one formatted event (the fmt layer hands over a whole line per call).
struct EventWriter;

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut target = sink().target.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *target {
            Target::Stderr => io::stderr().write(buf),
            Target::Stdout => io::stdout().write(buf),
            Target::File { file, .. } => file.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `TIME LEVEL message key=value ...`, or one JSON object per line.
struct EventFormat;

impl<S, N> FormatEvent<S, N> for EventFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let mut time = String::with_capacity(24);
        super::time::write_now(&mut time);
        let level = event.metadata().level().as_str();
        if sink().json.load(Ordering::Relaxed) {
            let mut fields = JsonFields::default();
            event.record(&mut fields);
            let mut line = String::with_capacity(128 + fields.rest.len());
            line.push_str("{\"time\":\"");
            line.push_str(&time);
            let _ = write!(line, "\",\"level\":\"{level}\",\"message\":");
            json_str(&mut line, &fields.message);
            line.push_str(&fields.rest);
            line.push_str("}\n");
            writer.write_str(&line)
        } else {
            write!(writer, "{time} {level:>5} ")?;
            ctx.field_format().format_fields(writer.by_ref(), event)?;
            writeln!(writer)
        }
    }
}

/// Collects an event's fields as JSON members (`,"key":value`).
#[derive(Default)]
struct JsonFields {
    message: String,
    rest: String,
}

impl JsonFields {
    fn key(&mut self, field: &Field) {
        self.rest.push(',');
        json_str(&mut self.rest, field.name());
        self.rest.push(':');
    }
}

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.key(field);
            json_str(&mut self.rest, &text);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.key(field);
            json_str(&mut self.rest, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.rest, "{value}");
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.rest, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        let _ = write!(self.rest, "{value}");
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.rest, "{value}");
        } else {
            json_str(&mut self.rest, &value.to_string());
        }
    }
}
