//! DNS discovery end to end: a DNS server in the test (UDP on 127.0.0.1, answers from a table
//! the test changes), real backends, the real binary. Velocity follows the records: added,
//! drained (a slow request on the vanished backend completes), removed; the last good set is
//! kept on SERVFAIL and on an empty answer, and that is counted.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use http_body_util::Full;
use hyper::Request;
use serde_json::Value;
use tokio::net::UdpSocket;

/// What the test's DNS server answers.
#[derive(Default)]
struct Zone {
    /// `_http._tcp.web.test.` SRV records: (port, weight); targets are `host.test.`.
    srv: Vec<(u16, u16)>,
    /// `web.test.` A records.
    a: Vec<Ipv4Addr>,
    servfail: bool,
    queries: usize,
}

type SharedZone = Arc<Mutex<Zone>>;

async fn dns_server(zone: SharedZone) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else { return };
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            let answer = answer(&query, &mut zone.lock().unwrap());
            let _ = sock.send_to(&answer.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

fn answer(q: &Message, zone: &mut Zone) -> Message {
    zone.queries += 1;
    let mut m = Message::response(q.metadata.id, q.metadata.op_code);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = true;
    m.add_queries(q.queries.clone());
    if zone.servfail {
        m.metadata.response_code = ResponseCode::ServFail;
        return m;
    }
    let host = Name::from_ascii("host.test.").unwrap();
    let localhost = || RData::A(A(Ipv4Addr::LOCALHOST));
    for query in &q.queries {
        let name = query.name().to_ascii().to_ascii_lowercase();
        match (query.query_type(), name.as_str()) {
            (RecordType::SRV, "_http._tcp.web.test.") => {
                for (port, weight) in &zone.srv {
                    let srv = SRV::new(10, *weight, *port, host.clone());
                    m.add_answer(Record::from_rdata(query.name().clone(), 1, RData::SRV(srv)));
                }
                if !zone.srv.is_empty() {
                    m.additionals.push(Record::from_rdata(host.clone(), 1, localhost()));
                }
            }
            (RecordType::A, "host.test.") => {
                m.add_answer(Record::from_rdata(host.clone(), 1, localhost()));
            }
            (RecordType::A, "web.test.") => {
                for ip in &zone.a {
                    m.add_answer(Record::from_rdata(query.name().clone(), 1, RData::A(A(*ip))));
                }
            }
            _ => {}
        }
    }
    m
}

async fn api_get(admin: SocketAddr, path: &str) -> String {
    let req = Request::builder().uri(path).header("host", admin.to_string()).body(Full::new(Bytes::new())).unwrap();
    Client::connect(admin).await.send(req).await.body
}

/// (address, weight, state, source) of the service's backends, as the API shows them.
async fn backends(admin: SocketAddr) -> Vec<(String, u64, String, String)> {
    let v: Value = serde_json::from_str(&api_get(admin, "/api/v1/services/web").await).unwrap();
    v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_owned(),
                b["weight"].as_u64().unwrap(),
                b["state"].as_str().unwrap().to_owned(),
                b["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn until_backends(admin: SocketAddr, want: &[(SocketAddr, u64, &str)]) {
    let mut want: Vec<(String, u64, String, String)> =
        want.iter().map(|(a, w, st)| (a.to_string(), *w, st.to_string(), "dns:web".to_owned())).collect();
    want.sort();
    let start = std::time::Instant::now();
    loop {
        let mut got = backends(admin).await;
        got.sort();
        if got == want {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "backends {got:?}, expected {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn errors_counted(admin: SocketAddr) -> u64 {
    let text = api_get(admin, "/metrics").await;
    text.lines()
        .find(|l| l.starts_with("velocity_discovery_errors_total{") && l.contains("source=\"dns:web\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn config(dns: SocketAddr, discovery: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:0}}\nshutdown: {{drain_timeout: 10s}}\nservices:\n  - name: web\n    discovery:\n      dns: {{{discovery}, resolver: \"{dns}\", refresh: 1s}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_are_followed_added_drained_removed_and_kept_on_servfail() {
    let b1 = TestBackend::start("b1").await;
    let b2 = TestBackend::start_slow("b2", Duration::from_millis(1500)).await;
    let b3 = TestBackend::start("b3").await;
    let zone: SharedZone = Arc::default();
    zone.lock().unwrap().srv = vec![(b1.addr.port(), 1), (b2.addr.port(), 3)];
    let dns = dns_server(zone.clone()).await;
    let v = Velocity::start(&config(dns, "name: _http._tcp.web.test., type: SRV")).await;
    let admin = v.admin_addr().await;

    // SRV weights become backend weights.
    until_backends(admin, &[(b1.addr, 1, "active"), (b2.addr, 3, "active")]).await;
    let mut client = Client::connect(v.addr()).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let r = client.get("web", "/").await;
        assert_eq!(r.status, 200);
        seen.insert(r.backend());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // b2 vanishes while a slow request is on it: drained, the request completes, then gone.
    let slow = tokio::spawn(async move {
        let mut c = Client::connect(v.addr()).await;
        let mut tries = 0;
        loop {
            // Round robin over two: one of the first tries lands on b2.
            let r = c.get("web", "/slow").await;
            tries += 1;
            if r.backend() == "b2" || tries > 10 {
                return (r, v);
            }
        }
    });
    let start = std::time::Instant::now();
    while b2.hits() == 0 {
        assert!(start.elapsed() < DEADLINE, "the slow request never reached b2");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    zone.lock().unwrap().srv = vec![(b1.addr.port(), 1), (b3.addr.port(), 2)];
    until_backends(admin, &[(b1.addr, 1, "active"), (b3.addr, 2, "active"), (b2.addr, 3, "draining")]).await;
    let b2_hits = b2.hits();
    let (r, v) = slow.await.unwrap();
    assert_eq!((r.status, r.backend().as_str()), (200, "b2"), "the request in flight on the drained backend completes");
    until_backends(admin, &[(b1.addr, 1, "active"), (b3.addr, 2, "active")]).await;
    let mut client = Client::connect(v.addr()).await;
    for _ in 0..20 {
        let r = client.get("web", "/").await;
        assert_eq!(r.status, 200);
        assert_ne!(r.backend(), "b2");
    }
    assert_eq!(b2.hits(), b2_hits, "no new request reached the drained backend");

    // SERVFAIL: the last good set stays, the failure is counted and logged.
    let before = errors_counted(admin).await;
    zone.lock().unwrap().servfail = true;
    let start = std::time::Instant::now();
    while errors_counted(admin).await < before + 2 {
        assert!(start.elapsed() < DEADLINE, "SERVFAIL was not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_backends(admin, &[(b1.addr, 1, "active"), (b3.addr, 2, "active")]).await;
    for _ in 0..10 {
        assert_eq!(client.get("web", "/").await.status, 200);
    }
    assert!(v.log_contains("keeping the last good set (2 backend(s))"), "{:#?}", v.log_lines());

    // The server answers again: followed again.
    zone.lock().unwrap().servfail = false;
    zone.lock().unwrap().srv = vec![(b3.addr.port(), 2)];
    until_backends(admin, &[(b3.addr, 2, "active")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_with_the_configured_port_and_an_empty_answer_keeps_the_set() {
    let b1 = TestBackend::start("b1").await;
    let zone: SharedZone = Arc::default();
    zone.lock().unwrap().a = vec![Ipv4Addr::LOCALHOST];
    let dns = dns_server(zone.clone()).await;
    let port = b1.addr.port();
    let v = Velocity::start(&config(dns, &format!("name: web.test., type: A, port: {port}"))).await;
    let admin = v.admin_addr().await;
    until_backends(admin, &[(b1.addr, 1, "active")]).await;
    assert_eq!(get(v.addr(), "web", "/").await.backend(), "b1");

    zone.lock().unwrap().a.clear();
    let before = errors_counted(admin).await;
    let start = std::time::Instant::now();
    while errors_counted(admin).await <= before {
        assert!(start.elapsed() < DEADLINE, "the empty answer was not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_backends(admin, &[(b1.addr, 1, "active")]).await;
    assert_eq!(get(v.addr(), "web", "/").await.status, 200);
    assert!(zone.lock().unwrap().queries >= 2);
}
