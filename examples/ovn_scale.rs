//! Issue 16's scale measurement of the Southbound replica, run by
//! `scripts/ovn-scale.sh` (which starts and fills the database): connects a
//! fresh [`SbMonitor`] as `metaproxy ovn` does, and prints as one JSON line
//! the time to a synced snapshot, the process' RSS before and after, the
//! rows the replica holds, and the time per (network, IP) lookup in its
//! index over the given queries (median of 3 runs).
//!
//! Usage: `ovn_scale SB_REMOTE CHASSIS QUERIES.json ITERS`, where
//! QUERIES.json is `[[network, ip], ...]`.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use metaproxy::ovn::ovsdb::{ConnOptions, Remote};
use metaproxy::ovn::replica::{Lookup, SbConfig, SbMonitor};

/// This process' resident set, in KiB (`VmRSS` of /proc/self/status).
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, remote, chassis, queries, iters] = args.as_slice() else {
        return Err("usage: ovn_scale SB_REMOTE CHASSIS QUERIES.json ITERS".into());
    };
    let iters: usize = iters.parse()?;
    let queries: Vec<(String, String)> = serde_json::from_str(&std::fs::read_to_string(queries)?)?;
    let queries: Vec<(String, IpAddr)> = queries
        .into_iter()
        .map(|(n, ip)| Ok((n, ip.parse()?)))
        .collect::<Result<_, std::net::AddrParseError>>()?;

    let rss_before = rss_kib();
    let t0 = Instant::now();
    let monitor = SbMonitor::start(SbConfig {
        remotes: Remote::parse_list(remote)?,
        conn: ConnOptions {
            probe_interval: Duration::ZERO,
            ..ConnOptions::default()
        },
        chassis: chassis.clone(),
    })?;
    while !monitor.shared().stats().synced {
        if t0.elapsed() > Duration::from_secs(60) {
            return Err("no synced snapshot within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let startup = t0.elapsed();
    let rss_after = rss_kib();
    let r = monitor.shared().snapshot();

    // Every query must resolve, as Neutron's scan does over the same rows.
    for (net, ip) in &queries {
        if !matches!(r.lookup(net, *ip), Lookup::Found(_)) {
            return Err(format!("{net} {ip} does not resolve").into());
        }
    }
    let mut runs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..iters {
            for (net, ip) in &queries {
                black_box(r.lookup(black_box(net), black_box(*ip)));
            }
        }
        runs.push(t.elapsed().as_secs_f64() * 1e6 / (iters * queries.len()) as f64);
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let rows: serde_json::Map<String, serde_json::Value> = [
        "Port_Binding",
        "Datapath_Binding",
        "Chassis",
        "Chassis_Private",
        "SB_Global",
    ]
    .iter()
    .map(|t| (t.to_string(), r.table(t).map_or(0, |t| t.len()).into()))
    .collect();
    println!(
        "{}",
        serde_json::json!({
            "startup_ms": startup.as_secs_f64() * 1e3,
            "rss_kib_before": rss_before,
            "rss_kib_synced": rss_after,
            "replica_rows": rows,
            "lookups": iters * queries.len(),
            "us_per_lookup_runs": runs,
            "us_per_lookup_median": sorted[1],
        })
    );
    Ok(())
}
