//! Load for one pooled hop (issue 13, `scripts/bench-hops.sh`): what the
//! proxy's pool does to the agent's socket, or the agent's pool to the
//! API's port, without a proxy. It opens `conns` connections once and keeps
//! `depth` requests in flight on each (closed loop: an answer read is
//! replaced by the next request, all that a read completed going out in one
//! write), until `total` requests are answered. Requests come from a file of
//! request heads (GET, no body), used round-robin.
//!
//! It prints requests, seconds, req/s, how many answers were not 200, and
//! its own CPU per request over the run (user and kernel, µs): that is what
//! the client half of a pooled hop costs (a write of the batch, a read of
//! the answers, framing them), the part the proxy pays for its hop to the
//! agent. It exits non-zero if an answer was not 200, or a connection ended
//! early.
//!
//! Usage: `hop_driver unix:PATH|tcp:ADDR REQUESTS_FILE [conns=8] [depth=1] [total=100000]`

use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use metaproxy::rt;

enum Conn {
    Unix(rt::UnixConn),
    Tcp(rt::TcpConn),
}

impl Conn {
    async fn read(&self, buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
        match self {
            Conn::Unix(c) => c.read_append(buf, 16 * 1024).await,
            Conn::Tcp(c) => c.read_append(buf, 16 * 1024).await,
        }
    }
    async fn write(&self, buf: Vec<u8>) -> (std::io::Result<()>, Vec<u8>) {
        match self {
            Conn::Unix(c) => c.write_all(buf).await,
            Conn::Tcp(c) => c.write_all(buf).await,
        }
    }
}

/// One whole answer at the front of `buf`: (its length, its status).
fn answer(buf: &[u8]) -> Option<(usize, u16)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let len: usize = head
        .split("\r\n")
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= end + len).then_some((end + len, status))
}

struct Shared {
    reqs: Vec<Vec<u8>>,
    next: Cell<usize>,
    left: Cell<usize>,
    bad: Cell<usize>,
    done: Cell<usize>,
}

impl Shared {
    /// Claim the next request, if any are left to send.
    fn claim(&self, out: &mut Vec<u8>) -> bool {
        if self.left.get() == 0 {
            return false;
        }
        self.left.set(self.left.get() - 1);
        let i = self.next.get();
        self.next.set((i + 1) % self.reqs.len());
        out.extend_from_slice(&self.reqs[i]);
        true
    }
}

async fn drive(conn: Conn, depth: usize, s: Rc<Shared>) -> Result<(), String> {
    let mut out = Vec::new();
    let mut inflight = 0;
    for _ in 0..depth {
        if s.claim(&mut out) {
            inflight += 1;
        }
    }
    let mut buf = Vec::with_capacity(64 * 1024);
    while inflight > 0 {
        if !out.is_empty() {
            let (res, o) = conn.write(std::mem::take(&mut out)).await;
            out = o;
            out.clear();
            res.map_err(|e| format!("write: {e}"))?;
        }
        let (res, b) = conn.read(buf).await;
        buf = b;
        match res {
            Ok(0) => return Err(format!("closed with {inflight} in flight")),
            Err(e) => return Err(format!("read: {e}")),
            Ok(_) => {}
        }
        let mut at = 0;
        while let Some((len, status)) = answer(&buf[at..]) {
            at += len;
            inflight -= 1;
            s.done.set(s.done.get() + 1);
            if status != 200 {
                if s.bad.get() == 0 {
                    eprintln!(
                        "first non-200: {}",
                        String::from_utf8_lossy(&buf[at - len..at.min(at - len + 300)])
                    );
                }
                s.bad.set(s.bad.get() + 1);
            }
            if s.claim(&mut out) {
                inflight += 1;
            }
        }
        buf.drain(..at);
    }
    Ok(())
}

/// This process's user and kernel CPU time so far, in clock ticks.
fn own_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let mut f = rest.split(' ').skip(11);
    let mut next = || f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    (next(), next())
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bad_arg =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
    let target = args
        .first()
        .ok_or_else(|| bad_arg("target: unix:PATH or tcp:ADDR"))?
        .clone();
    let file = args.get(1).ok_or_else(|| bad_arg("requests file"))?;
    let num = |i: usize, d: usize| -> std::io::Result<usize> {
        args.get(i)
            .map_or(Ok(d), |s| s.parse().map_err(|_| bad_arg("a count")))
    };
    let (conns, depth, total) = (num(2, 8)?, num(3, 1)?, num(4, 100_000)?);
    let text = std::fs::read(file)?;
    let mut reqs = Vec::new();
    let mut rest = &text[..];
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        reqs.push(rest[..end + 4].to_vec());
        rest = &rest[end + 4..];
    }
    if reqs.is_empty() {
        return Err(bad_arg("no request heads in the file"));
    }
    let s = Rc::new(Shared {
        reqs,
        next: Cell::new(0),
        left: Cell::new(total),
        bad: Cell::new(0),
        done: Cell::new(0),
    });
    let s2 = s.clone();
    let (ok, secs, user, sys) = rt::block_on(async move {
        let mut cs = Vec::new();
        for _ in 0..conns {
            let c = if let Some(p) = target.strip_prefix("unix:") {
                Conn::Unix(rt::UnixConn::connect(std::path::Path::new(p)).await?)
            } else {
                let a = target.strip_prefix("tcp:").unwrap_or(&target);
                let a = a.parse().map_err(|_| bad_arg("tcp address"))?;
                Conn::Tcp(rt::TcpConn::connect(a, None).await?)
            };
            cs.push(c);
        }
        let c0 = own_ticks();
        let t0 = Instant::now();
        let tasks: Vec<_> = cs
            .into_iter()
            .map(|c| rt::spawn_handle(drive(c, depth, s2.clone())))
            .collect();
        let mut ok = true;
        for t in tasks {
            match t.join().await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    eprintln!("connection: {e}");
                    ok = false;
                }
                None => ok = false,
            }
        }
        let c1 = own_ticks();
        Ok::<_, std::io::Error>((ok, t0.elapsed().as_secs_f64(), c1.0 - c0.0, c1.1 - c0.1))
    })??;
    let done = s.done.get();
    let hz = 100.0; // USER_HZ: the unit of /proc/*/stat times on Linux
    let per = |t: u64| t as f64 / hz * 1e6 / done.max(1) as f64;
    println!(
        "requests {done} seconds {secs:.3} req/s {:.0} non-200 {} user {:.2} sys {:.2}",
        done as f64 / secs,
        s.bad.get(),
        per(user),
        per(sys)
    );
    if !ok || s.bad.get() > 0 || done != total {
        std::process::exit(1);
    }
    Ok(())
}
