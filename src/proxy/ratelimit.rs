//! Per-client-IP request rate limits, like Neutron's haproxy stick tables.
//!
//! Neutron renders two haproxy tables (`base` and `burst`) that track
//! `http_req_rate(window)` per source IP and deny with 429 when a rate is
//! *greater than* its limit. We keep the same two windows. Each is a sliding
//! window approximated with two fixed buckets (the previous bucket weighted
//! by how much of it still overlaps the window), which is what haproxy's
//! `http_req_rate` does too. The table is bounded (`table_size`, haproxy's
//! `size 10k`): when full, expired entries go first, then the least recently
//! seen. A denied request costs no upstream work.
//!
//! One table per process, behind a mutex: a VM's connections may land on any
//! loop and the limit is per VM, not per loop. This is the one lock on the
//! request path, it is off by default, and it is held for a hash lookup.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// haproxy's `stick-table … size 10k` as Neutron renders it.
pub const DEFAULT_TABLE_SIZE: usize = 10_000;

/// One window: at most `limit` requests per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Window length.
    pub window: Duration,
    /// Requests allowed within it.
    pub limit: u32,
}

/// Validated `[proxy.rate_limit]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Base window.
    pub base: Window,
    /// Burst window.
    pub burst: Window,
    /// Tracked clients at most.
    pub table_size: usize,
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    start: Instant,
    current: u32,
    previous: u32,
}

impl Counter {
    fn new(now: Instant) -> Self {
        Counter {
            start: now,
            current: 0,
            previous: 0,
        }
    }

    /// Roll the buckets forward to `now` and return the sliding-window rate.
    fn rate(&mut self, w: Duration, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= w * 2 {
            *self = Counter::new(now);
        } else if elapsed >= w {
            self.previous = self.current;
            self.current = 0;
            self.start += w;
        }
        let into = now.saturating_duration_since(self.start).as_secs_f64() / w.as_secs_f64();
        f64::from(self.previous) * (1.0 - into).max(0.0) + f64::from(self.current)
    }
}

#[derive(Debug)]
struct Entry {
    base: Counter,
    burst: Counter,
    last_seen: Instant,
}

/// The shared table.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimitConfig,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

impl RateLimiter {
    /// An empty table.
    pub fn new(cfg: RateLimitConfig) -> Self {
        RateLimiter {
            cfg,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Count one request from `client`; `false` means answer 429.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        let Ok(mut t) = self.table.lock() else {
            return true; // a poisoned table must not take the service down
        };
        if !t.contains_key(&client) && t.len() >= self.cfg.table_size {
            self.make_room(&mut t, now);
        }
        let e = t.entry(client).or_insert_with(|| Entry {
            base: Counter::new(now),
            burst: Counter::new(now),
            last_seen: now,
        });
        e.last_seen = now;
        let base = e.base.rate(self.cfg.base.window, now);
        let burst = e.burst.rate(self.cfg.burst.window, now);
        // haproxy tracks the request, then denies if the rate is `gt` the limit.
        e.base.current = e.base.current.saturating_add(1);
        e.burst.current = e.burst.current.saturating_add(1);
        base + 1.0 <= f64::from(self.cfg.base.limit)
            && burst + 1.0 <= f64::from(self.cfg.burst.limit)
    }

    fn make_room(&self, t: &mut HashMap<IpAddr, Entry>, now: Instant) {
        let horizon = self.cfg.base.window.max(self.cfg.burst.window) * 2;
        t.retain(|_, e| now.saturating_duration_since(e.last_seen) < horizon);
        if t.len() >= self.cfg.table_size {
            if let Some(oldest) = t.iter().min_by_key(|(_, e)| e.last_seen).map(|(k, _)| *k) {
                t.remove(&oldest);
            }
        }
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.table.lock().map_or(0, |t| t.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limit: u32, burst: u32, size: usize) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            base: Window {
                window: Duration::from_secs(10),
                limit,
            },
            burst: Window {
                window: Duration::from_secs(1),
                limit: burst,
            },
            table_size: size,
        })
    }

    #[test]
    fn denies_beyond_the_limit_per_client_and_recovers() {
        let l = limiter(10, 100, 100);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        let b: IpAddr = "10.0.0.6".parse().unwrap();
        for i in 0..10 {
            assert!(l.allow(a, t0), "request {i} within the limit");
        }
        assert!(!l.allow(a, t0), "11th in the window");
        assert!(l.allow(b, t0), "another VM is unaffected");
        // Two windows later everything is forgotten.
        assert!(l.allow(a, t0 + Duration::from_secs(21)));
    }

    #[test]
    fn burst_window_is_checked_too() {
        let l = limiter(1000, 3, 100);
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        assert!(l.allow(a, t0) && l.allow(a, t0) && l.allow(a, t0));
        assert!(!l.allow(a, t0));
        assert!(l.allow(a, t0 + Duration::from_secs(3)));
    }

    #[test]
    fn table_stays_bounded() {
        let l = limiter(10, 10, 64);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            l.allow(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(l.tracked() <= 64);
    }
}
