//! `process_*` metrics, as the Prometheus client libraries name them, read from `/proc` at
//! scrape time (Linux; elsewhere only the start time is known).

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Clock ticks per second in `/proc/self/stat` (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

pub fn read() -> ProcessStats {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    let status = std::fs::read_to_string("/proc/self/status").ok();
    let limits = std::fs::read_to_string("/proc/self/limits").ok();
    ProcessStats {
        cpu_seconds: stat.as_deref().and_then(cpu_seconds),
        resident_bytes: status.as_deref().and_then(|s| status_kib(s, "VmRSS:")).map(|k| k * 1024),
        virtual_bytes: status.as_deref().and_then(|s| status_kib(s, "VmSize:")).map(|k| k * 1024),
        open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64),
        max_fds: limits.as_deref().and_then(max_open_files),
    }
}

/// utime + stime: fields 14 and 15, counted after the `(comm)` field, which may hold spaces.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_ascii_whitespace().next()?.parse().ok()
}

fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_ascii_whitespace().next()?.parse().ok()
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, ty: MetricType, v: Option<f64>) -> std::fmt::Result {
    let Some(v) = v else { return Ok(()) };
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    match ty {
        MetricType::Counter => m.encode_counter::<NoLabelSet, f64, f64>(&v, None),
        _ => m.encode_gauge(&v),
    }
}

pub fn encode(enc: &mut DescriptorEncoder, started: SystemTime) -> std::fmt::Result {
    let p = read();
    let start = started.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    gauge(
        enc,
        "process_cpu_seconds",
        "User and system CPU time spent in seconds.",
        MetricType::Counter,
        p.cpu_seconds,
    )?;
    let rss = p.resident_bytes.map(|v| v as f64);
    gauge(enc, "process_resident_memory_bytes", "Resident memory size in bytes.", MetricType::Gauge, rss)?;
    let vsz = p.virtual_bytes.map(|v| v as f64);
    gauge(enc, "process_virtual_memory_bytes", "Virtual memory size in bytes.", MetricType::Gauge, vsz)?;
    let fds = p.open_fds.map(|v| v as f64);
    gauge(enc, "process_open_fds", "Number of open file descriptors.", MetricType::Gauge, fds)?;
    let max = p.max_fds.map(|v| v as f64);
    gauge(enc, "process_max_fds", "Maximum number of open file descriptors.", MetricType::Gauge, max)?;
    gauge(
        enc,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        MetricType::Gauge,
        Some(start),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "12 (velo city) S 1 12 12 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 4 0 100 0 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(status_kib("Name:\tv\nVmSize:\t  2048 kB\nVmRSS:\t 512 kB\n", "VmRSS:"), Some(512));
        let limits = "Limit  Soft Limit Hard Limit Units\nMax open files            1024                 4096                 files\n";
        assert_eq!(max_open_files(limits), Some(1024));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let p = read();
        assert!(p.cpu_seconds.is_some() && p.resident_bytes.unwrap() > 0 && p.open_fds.unwrap() > 0, "{p:?}");
    }
}
