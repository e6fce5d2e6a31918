//! Real Redis for the cluster tests: `redis-server` processes on free ports (a single one, or a
//! 3-node Redis Cluster made with `redis-cli --cluster create`), readiness polled with PING
//! under a deadline, killed by PID on drop. And a TCP relay a test can cut, to take one
//! Velocity instance off the store while the others keep it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::{temp_path, DEADLINE};

/// A port that is free now, with its cluster bus port (port + 10000) free too.
fn free_port() -> u16 {
    for _ in 0..200 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().unwrap().port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair");
}

/// One `redis-server` process.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(free_port(), false)
    }

    fn start_on(port: u16, cluster: bool) -> RedisServer {
        let dir = temp_path(&format!("redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = RedisServer { child: None, port, dir, cluster };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]);
            cmd.args(["--cluster-config-file", &format!("nodes-{}.conf", self.port)]);
        }
        let child = cmd.spawn().expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let start = Instant::now();
        while !self.ping() {
            assert!(start.elapsed() < DEADLINE, "redis-server on port {} did not answer PING", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A RESP command over a fresh connection; the raw reply.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        command(self.addr(), args)
    }

    pub fn ping(&self) -> bool {
        self.command(&["PING"]).is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Kill it: connections are refused until [`RedisServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port (empty: nothing is saved).
    pub fn restart(&mut self) {
        self.kill();
        let start = Instant::now();
        // The port may linger a moment after the kill.
        while std::net::TcpListener::bind(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < DEADLINE, "port {} stays taken", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
        self.spawn();
    }

    /// SIGSTOP: the process hangs with its connections open (a paused VM, a black hole).
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").arg(sig).arg(pid.to_string()).status().is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped process only dies of SIGKILL once continued on some kernels.
            let _ = Command::new("kill").arg("-CONT").arg(c.id().to_string()).status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Encode and send one command; read what comes back within a second.
pub fn command(addr: SocketAddr, args: &[&str]) -> Option<String> {
    let mut s = StdTcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    // Enough for the small replies the tests read: stop once a reply looks complete.
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"\r\n") && complete(&out) {
            break;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Whether a RESP reply (simple or bulk) is whole.
fn complete(reply: &[u8]) -> bool {
    match reply.first() {
        Some(b'$') => {
            let text = String::from_utf8_lossy(reply);
            let Some((len, rest)) = text[1..].split_once("\r\n") else { return false };
            match len.parse::<i64>() {
                Ok(n) if n < 0 => true,
                Ok(n) => rest.len() >= n as usize + 2,
                Err(_) => true,
            }
        }
        Some(b'*') => {
            // Arrays are only read for their first line here.
            true
        }
        _ => true,
    }
}

/// A 3-node Redis Cluster (three masters, no replicas).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_on(free_port(), true)).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("redis-cli");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let start = Instant::now();
        for n in &nodes {
            while !n.command(&["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok")) {
                assert!(start.elapsed() < DEADLINE * 3, "the Redis Cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    /// The YAML list of the nodes' URLs.
    pub fn urls_yaml(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(RedisServer::url).collect();
        format!("[{}]", urls.join(", "))
    }
}

/// The store a test runs against: one Redis or a Redis Cluster.
pub enum Store {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Store {
    pub fn single() -> Store {
        Store::Single(RedisServer::start())
    }

    pub fn cluster() -> Store {
        Store::Cluster(RedisCluster::start())
    }

    /// What `cluster.redis` says.
    pub fn redis_yaml(&self) -> String {
        match self {
            Store::Single(s) => s.url(),
            Store::Cluster(c) => c.urls_yaml(),
        }
    }

    pub fn servers(&mut self) -> Vec<&mut RedisServer> {
        match self {
            Store::Single(s) => vec![s],
            Store::Cluster(c) => c.nodes.iter_mut().collect(),
        }
    }
}

/// A TCP relay to `target` that a test can cut: `cut` closes every relayed connection and
/// refuses new ones (by closing them at once) until `restore`.
pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<JoinSet<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let (c, set) = (cut.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                set.lock().unwrap().spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Relay { addr, cut, conns, task }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.conns.lock().unwrap().abort_all();
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.conns.lock().unwrap().abort_all();
    }
}
