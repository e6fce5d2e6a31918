//! Process lifecycle: load the config, open listeners, serve; reload on SIGHUP or a file change;
//! reopen log files on SIGUSR1 (and SIGHUP); drain and exit on SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::ListenerConfig;
use crate::config::{self, Config};
use crate::membership::{Change, ChangeError, ErrorKind, Membership, Outcome, Source, DRAIN_POLL};
use crate::observe::{events, history};
use crate::proxy::{Listener, ListenerSettings, Tracker};
use crate::state::Shared;

/// How often `--watch` looks at the config file.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Clone)]
pub struct Options {
    /// The file the config came from; reloads read it again. `None`: reload is not possible.
    pub config_path: Option<PathBuf>,
    /// Reload when the file's content changes.
    pub watch: bool,
}

/// Serve `config` until told to stop. `Ok` after a graceful shutdown (drained, or the drain
/// timeout passed); `Err` when a second signal cut the drain short.
pub async fn run(config: Config, options: Options) -> Result<(), String> {
    // Before any listener: a signal that arrives once "listening" is logged must be handled,
    // not take the default action (which kills the process, even for SIGHUP).
    let mut signals = Signals::new()?;
    let listen = config.all_listeners();
    let admin_config = config.admin.clone();
    let cluster_config = config.cluster.clone();
    events::configure(&config.event_log, config.log_format)
        .map_err(|e| format!("cannot open the event log {}: {e}", config.event_log))?;
    // After the event log is set up, so the line goes where events go, in their format.
    let fd_limit = crate::fd_limit::raise_and_log();
    if let Some(limit) = fd_limit {
        crate::fd_limit::check(&config, limit);
    }
    let (mut membership, handle, mut commands) = Membership::start(config)?;
    let state: Shared = membership.shared();
    let mut sources = crate::discovery::Sources::new(handle.clone(), state.clone());
    sources.sync(&state.load().config);
    let cluster = cluster_config.map(|c| crate::cluster::Cluster::start(&c, handle.clone())).transpose()?;
    let tracker = Arc::new(Tracker::default());
    history::spawn_sampler(state.clone());
    crate::policy::spawn_sweeper(state.clone());
    let mut listeners = Vec::new();
    for config in listen {
        listeners.push(open_listener(config, &state, &tracker).await?);
    }
    publish_certificates(&listeners, &state);
    let admin = match &admin_config {
        Some(cfg) => {
            let token = admin::token(cfg)?;
            let admin_state = AdminState {
                shared: state.clone(),
                membership: handle,
                token,
                metrics_public: cfg.metrics_public,
                cluster: cluster.clone(),
            };
            Some(admin::start(cfg, admin_state).await?)
        }
        None => None,
    };

    let mut watch = match (&options.config_path, options.watch) {
        (Some(path), true) => Some(FileWatch::new(path.clone(), &state.load().config).await),
        _ => None,
    };
    // The one writer of the running state: every change, whatever its source, is applied here
    // in turn.
    let stop_signal = loop {
        let (source, reply) = tokio::select! {
            sig = signals.next() => match sig {
                Sig::Stop(name) => break name,
                Sig::Reload => (Source::Reload("SIGHUP"), None),
                Sig::Reopen => {
                    reopen_logs("SIGUSR1", &state).await;
                    continue;
                }
            },
            _ = file_changed(&mut watch) => (Source::Reload("file change"), None),
            Some(cmd) = commands.recv() => match cmd.change {
                Change::Reload => (Source::Reload("admin API"), Some(cmd.reply)),
                change => {
                    let result = membership.apply(cmd.source, change).await;
                    let _ = cmd.reply.send(result);
                    sources.sync(&state.load().config);
                    continue;
                }
            },
            _ = tokio::time::sleep(DRAIN_POLL), if membership.is_draining() => {
                membership.finish_drains().await;
                continue;
            }
        };
        let Source::Reload(reason) = source else { continue };
        let result = match &options.config_path {
            Some(path) => reload(path, reason, &mut membership, &mut listeners, &tracker).await,
            None => {
                warn!("reload ({reason}) ignored: this config was not read from a file");
                Err(ChangeError::new(ErrorKind::Invalid, "this config was not read from a file", None))
            }
        };
        state.load().metrics.reload_done(result.is_ok());
        sources.sync(&state.load().config);
        if let Some(w) = &mut watch {
            w.set_certificates(&state.load().config).await;
        }
        if let Some(limit) = fd_limit {
            crate::fd_limit::check(&state.load().config, limit);
        }
        if reason == "SIGHUP" {
            // logrotate configs written for NGINX send either signal: both reopen.
            reopen_logs("SIGHUP", &state).await;
        }
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    };

    // The admin API stops first: no changes while draining (sources that still send get an
    // error rather than waiting).
    drop(admin);
    drop(commands);
    if let Some(c) = &cluster {
        c.leave().await;
    }
    let result = shutdown(stop_signal, &mut signals, &state, &listeners, &tracker).await;
    // After the drain: managed backends serve their last requests first.
    sources.stop().await;
    result
}

/// Pending connections the kernel queues for us (it caps this at `net.core.somaxconn`). The
/// standard library's 128 overflows under a burst of connects, and every dropped SYN costs the
/// client a 1 s retransmit; NGINX uses 511, HAProxy its maxconn.
const LISTEN_BACKLOG: u32 = 4096;

/// Load a listener's certificates, bind its address and start accepting.
async fn open_listener(config: ListenerConfig, state: &Shared, tracker: &Arc<Tracker>) -> Result<Listener, String> {
    let ticketer = crate::tls::ticketer()?;
    let settings = ListenerSettings::build(config, state.load().config.http2, &ticketer)?;
    let socket = bind(&settings.config).await?;
    Ok(Listener::start(settings, ticketer, socket, state.clone(), tracker.clone()))
}

/// The certificates now served, for `velocity_tls_certificate_expiry_timestamp_seconds`, with
/// a warning for each that expires soon.
fn publish_certificates(listeners: &[Listener], state: &Shared) {
    let now = crate::tls::unix_now();
    let mut rows = Vec::new();
    for l in listeners {
        let settings = l.settings();
        let name = &settings.config.name;
        let files = settings.config.tls.iter().flat_map(|t| &t.certificates);
        for (files, cert) in files.zip(&settings.certs) {
            if let Some(w) = crate::tls::expiry_warning(name, files, cert, now) {
                warn!("{w}");
            }
            if let Some(t) = cert.not_after {
                rows.push((name.clone(), cert.label(files), t));
            }
        }
    }
    state.load().metrics.set_tls_certificates(rows);
}

async fn bind(config: &ListenerConfig) -> Result<TcpListener, String> {
    let addr = config.addr;
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        // A restarted Velocity can bind at once while the old sockets sit in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    let listener = listen().map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    // Tests and scripts read this line to learn the port when the config says `:0`.
    let scheme = config.scheme();
    if config.name == addr.to_string() {
        info!("listening on {scheme}://{local}");
    } else {
        info!("listening on {scheme}://{local} (listener {})", config.name);
    }
    Ok(listener)
}

/// Open every log file again by its name (after logrotate renamed it): the event log and the
/// access log. Lines written before the signal are in the old file.
async fn reopen_logs(reason: &str, state: &Shared) {
    if let Err(e) = events::reopen() {
        error!("reopening the event log ({reason}) failed: {e}; still writing to the old file");
    }
    if let Some(log) = state.load().access_log.clone() {
        match tokio::task::spawn_blocking(move || log.reopen(Duration::from_secs(5))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("reopening the access log ({reason}) failed: {e}; still writing to the old file"),
            Err(e) => error!("reopening the access log ({reason}) failed: {e}"),
        }
    }
    info!("log files reopened ({reason})");
}

/// Load, validate and switch to the config in `path` (merged with the overlay); on any
/// problem keep the current one.
async fn reload(
    path: &Path,
    reason: &'static str,
    membership: &mut Membership,
    listeners: &mut Vec<Listener>,
    tracker: &Arc<Tracker>,
) -> Result<Outcome, ChangeError> {
    let shown = path.display();
    let new = match config::load(path) {
        Ok(cfg) => cfg,
        Err(errors) => {
            error!(
                "reload rejected ({reason}): {} problem(s) in {shown}; still serving the previous config",
                errors.len()
            );
            for e in &errors {
                error!("{e}");
            }
            let mut err = ChangeError::new(
                ErrorKind::Invalid,
                format!("{} problem(s) in {shown}; still serving the previous config", errors.len()),
                None,
            );
            err.details = errors.iter().map(ToString::to_string).collect();
            return Err(err);
        }
    };
    let old_admin = membership.snapshot().config.admin.clone();
    if new.admin != old_admin {
        warn!("reload ({reason}): changes to `admin` take effect at the next start");
    }
    if new.cluster != membership.snapshot().config.cluster {
        warn!("reload ({reason}): changes to `cluster` take effect at the next start");
    }
    let desired = membership.prepare_reload(new.clone()).await;
    // Listeners are known by their address: one still configured keeps its socket and gets
    // the new settings, one no longer configured closes, a new address opens. Certificates
    // load and added listeners open before switching, so a bad certificate or a port in use
    // rejects the whole reload. (Port 0 listeners, which get any free port, are known by
    // address and name.)
    let mut kept: Vec<Option<ListenerSettings>> = listeners.iter().map(|_| None).collect();
    let mut added = Vec::new();
    let http2 = desired.config.http2;
    for config in desired.config.all_listeners() {
        // Port 0 listeners (any free port) are told apart by name.
        let same = |(i, l): &(usize, &Listener)| {
            kept[*i].is_none()
                && l.configured == config.addr
                && (config.addr.port() != 0 || l.settings().config.name == config.name)
        };
        let opened = match listeners.iter().enumerate().find(same).map(|(i, _)| i) {
            Some(i) => ListenerSettings::build(config, http2, &listeners[i].ticketer).map(|s| kept[i] = Some(s)),
            None => {
                match crate::tls::ticketer().and_then(|t| ListenerSettings::build(config, http2, &t).map(|s| (s, t))) {
                    Ok((settings, ticketer)) => {
                        bind(&settings.config).await.map(|socket| added.push((settings, ticketer, socket)))
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = opened {
            error!("reload rejected ({reason}): {e}; still serving the previous config");
            return Err(ChangeError::new(ErrorKind::Failed, e, Some("listeners")));
        }
    }
    if let Err(e) = events::configure(&new.event_log, new.log_format) {
        error!(
            "reload rejected ({reason}): cannot open the event log {}: {e}; still serving the previous config",
            new.event_log
        );
        return Err(ChangeError::new(ErrorKind::Failed, format!("cannot open the event log: {e}"), Some("event_log")));
    }
    let (old_events, old_format) =
        (membership.snapshot().config.event_log.clone(), membership.snapshot().config.log_format);
    let outcome = match membership.commit_reload(Source::Reload(reason), new, desired) {
        Ok(o) => o,
        Err(e) => {
            error!("reload rejected ({reason}): {}; still serving the previous config", e.message);
            let _ = events::configure(&old_events, old_format);
            return Err(e);
        }
    };
    let cfg = outcome.snapshot.config.clone();
    let state = membership.shared();

    let mut removed = 0;
    let mut kept = kept.into_iter();
    listeners.retain(|l| {
        if let Some(settings) = kept.next().flatten() {
            l.update(settings);
            return true;
        }
        let scheme = l.settings().config.scheme();
        info!("closing listener {scheme}://{}: removed from the config; its open connections drain", l.local);
        l.stop(cfg.shutdown.drain_timeout);
        removed += 1;
        false
    });
    let opened = added.len();
    for (settings, ticketer, socket) in added {
        listeners.push(Listener::start(settings, ticketer, socket, state.clone(), tracker.clone()));
    }
    publish_certificates(listeners, &state);
    info!(
        "reload ok ({reason}): {shown}: {} service(s), {} listener(s) ({opened} opened, {removed} closed)",
        cfg.services.len(),
        listeners.len()
    );
    Ok(outcome)
}

async fn shutdown(
    signal: &'static str,
    signals: &mut Signals,
    state: &Shared,
    listeners: &[Listener],
    tracker: &Tracker,
) -> Result<(), String> {
    let drain = state.load().config.shutdown.drain_timeout;
    info!(
        "shutdown ({signal}): no longer accepting; draining {} open connection(s), up to {drain:?} (signal again to exit now)",
        tracker.open()
    );
    for l in listeners {
        l.stop(drain);
    }
    // Connections give up at `drain` themselves; the extra second lets them close first.
    let deadline = tokio::time::sleep(drain + Duration::from_secs(1));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = tracker.wait_idle() => {
                // Connections give up at `drain_timeout` on their own: say how many were cut.
                match tracker.cut() {
                    0 => info!("shutdown: drained, exiting"),
                    cut => warn!("shutdown: drain_timeout ({drain:?}) passed with {cut} request(s) in progress, cut; exiting"),
                }
                flush_access_log(state).await;
                return Ok(());
            }
            _ = &mut deadline => {
                warn!("shutdown: drain_timeout ({drain:?}) passed with {} connection(s) open; exiting", tracker.open());
                flush_access_log(state).await;
                return Ok(());
            }
            sig = signals.next() => match sig {
                Sig::Stop(name) => {
                    return Err(format!("shutdown: second signal ({name}): exiting now with {} connection(s) open", tracker.open()));
                }
                Sig::Reload => warn!("reload (SIGHUP) ignored: shutting down"),
                Sig::Reopen => reopen_logs("SIGUSR1", state).await,
            },
        }
    }
}

/// The last requests' lines are still with the writer thread: get them out before exiting.
async fn flush_access_log(state: &Shared) {
    if let Some(log) = state.load().access_log.clone() {
        let _ = tokio::task::spawn_blocking(move || log.flush(Duration::from_secs(2))).await;
    }
}

async fn file_changed(watch: &mut Option<FileWatch>) {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// Polls the config file's content, and that of the certificate and key files it names;
/// `changed` resolves when one differs from the last seen.
struct FileWatch {
    path: PathBuf,
    last: Option<Vec<u8>>,
    /// TLS files of the running config and their content: a renewed certificate written over
    /// the old one reloads as an edit of the YAML does.
    certificates: Vec<(PathBuf, Option<Vec<u8>>)>,
    tick: tokio::time::Interval,
}

impl FileWatch {
    async fn new(path: PathBuf, config: &Config) -> FileWatch {
        let last = tokio::fs::read(&path).await.ok();
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = FileWatch { path, last, certificates: Vec::new(), tick };
        watch.set_certificates(config).await;
        info!("watching {} for changes", watch.path.display());
        watch
    }

    /// Watch the certificate and key files of `config` (after start and every reload).
    async fn set_certificates(&mut self, config: &Config) {
        let files = config.listeners.iter().flat_map(|l| l.tls.iter().flat_map(|t| &t.certificates));
        let paths: Vec<PathBuf> = files.flat_map(|c| [c.cert.clone(), c.key.clone()]).collect();
        // Files already watched keep the content last seen: after a reload rejected half-way
        // through a renewal (the certificate written, not yet its key), the key's change is
        // still to be seen, and reloads again.
        let mut watched = Vec::with_capacity(paths.len());
        for path in paths {
            let content = match self.certificates.iter().position(|(p, _)| *p == path) {
                Some(i) => self.certificates.swap_remove(i).1,
                None => tokio::fs::read(&path).await.ok(),
            };
            watched.push((path, content));
        }
        self.certificates = watched;
    }

    async fn changed(&mut self) {
        loop {
            self.tick.tick().await;
            // Content rather than mtime: mtime has coarse resolution on some filesystems, and
            // the file is small. A missing file (mid-rename) is not a change.
            let Ok(now) = tokio::fs::read(&self.path).await else { continue };
            if self.last.as_deref() != Some(&now[..]) {
                self.last = Some(now);
                return;
            }
            for (path, last) in &mut self.certificates {
                let Ok(now) = tokio::fs::read(&*path).await else { continue };
                if last.as_deref() != Some(&now[..]) {
                    *last = Some(now);
                    return;
                }
            }
        }
    }
}

enum Sig {
    Stop(&'static str),
    Reload,
    /// SIGUSR1: reopen the log files.
    Reopen,
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let watch = |kind: SignalKind, name: &str| signal(kind).map_err(|e| format!("cannot watch {name}: {e}"));
        Ok(Signals {
            term: watch(SignalKind::terminate(), "SIGTERM")?,
            int: watch(SignalKind::interrupt(), "SIGINT")?,
            hup: watch(SignalKind::hangup(), "SIGHUP")?,
            usr1: watch(SignalKind::user_defined1(), "SIGUSR1")?,
        })
    }

    async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = self.term.recv() => Sig::Stop("SIGTERM"),
            _ = self.int.recv() => Sig::Stop("SIGINT"),
            _ = self.hup.recv() => Sig::Reload,
            _ = self.usr1.recv() => Sig::Reopen,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> Result<Signals, String> {
        Ok(Signals)
    }

    async fn next(&mut self) -> Sig {
        let _ = tokio::signal::ctrl_c().await;
        Sig::Stop("Ctrl-C")
    }
}
