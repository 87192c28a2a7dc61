//! One loop of the storm and the request sequences a VM replays.
//!
//! The sequences follow `shared/spec/metadata-api.md` §2.1–2.2:
//! - `openstack`: `/openstack` (probe), `/openstack` (version list), then at
//!   2018-08-27 `meta_data.json`, `user_data`, `vendor_data.json`,
//!   `vendor_data2.json`, `network_data.json`;
//! - `ec2`: `2009-04-04/meta-data/instance-id` (readiness), the instance-id
//!   probes at 2021-03-23, 2018-09-24, 2016-09-02 (Nova 404s them), then
//!   `2009-04-04/user-data` and the `meta-data/` crawl;
//! - `cloud-init`: the OpenStack datasource, then its EC2 crawl of
//!   `latest/meta-data/` (what cloud-init 22.4 does on OpenStack: the EC2
//!   datasource itself never runs because OpenStack is found first);
//! - `keepalive`: 20 × `meta_data.json` on one connection.
//!
//! The crawl is the materializer's: `name/` is a directory (fetched with the
//! slash), `N=name` is fetched as `N/openssh-key`, `security-credentials` is
//! skipped. A VM carries on after a failed request (cloud-init would retry;
//! we count instead), so one error does not hide the rest.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use super::check::{self, Check, Leaf};
use super::client::{self, BufPool, Conn, ExchangeError, Permits};
use super::stats::{ErrorKind, LoopStats};
use super::{LoopProgress, Profile, Shared, VmSpec};
use crate::rt;

/// The OpenStack version cloud-init 22.4 picks against current Nova.
const OPENSTACK_VERSION: &str = "2018-08-27";
/// Requests in the keep-alive micro-profile.
const KEEPALIVE_REQUESTS: usize = 20;
/// EC2 versions cloud-init probes before falling back to 2009-04-04.
const EC2_PROBE_VERSIONS: [&str; 3] = ["2021-03-23", "2018-09-24", "2016-09-02"];
/// Bound on crawl size, against a server listing endless directories.
const MAX_CRAWL_REQUESTS: usize = 256;

/// Everything one loop's VMs share.
struct LoopCtx {
    shared: Arc<Shared>,
    index: usize,
    stats: std::cell::RefCell<LoopStats>,
    permits: Permits,
    pool: BufPool,
    running: std::cell::Cell<usize>,
    all_done: rt::sync::Notify,
}

impl LoopCtx {
    fn progress(&self) -> &LoopProgress {
        &self.shared.progress[self.index]
    }
}

/// Run this loop's share of the VMs (every `workers`-th, starting at
/// `index`), each at its scheduled time; return when all are done.
pub(crate) async fn run_loop(shared: Arc<Shared>, index: usize) -> LoopStats {
    let ctx = Rc::new(LoopCtx {
        permits: Permits::new(shared.conns_per_loop),
        shared,
        index,
        stats: std::cell::RefCell::new(LoopStats::new()),
        pool: BufPool::default(),
        running: std::cell::Cell::new(0),
        all_done: rt::sync::Notify::default(),
    });
    let n = ctx.shared.vms.len();
    for i in (index..n).step_by(ctx.shared.workers) {
        let at = ctx.shared.start_of(i);
        let now = Instant::now();
        if at > now {
            rt::sleep(at - now).await;
        }
        ctx.running.set(ctx.running.get() + 1);
        LoopProgress::bump(&ctx.progress().started);
        rt::spawn(run_vm(Rc::clone(&ctx), i, at));
    }
    while ctx.running.get() > 0 {
        ctx.all_done.notified().await;
    }
    let mut stats = std::mem::replace(&mut *ctx.stats.borrow_mut(), LoopStats::new());
    stats.fd_waits = ctx.permits.waits();
    stats
}

async fn run_vm(ctx: Rc<LoopCtx>, i: usize, scheduled: Instant) {
    let mut vm = Vm {
        ctx: &ctx,
        i,
        spec: &ctx.shared.vms[i],
        conn: None,
        req: Vec::new(),
        failed: false,
    };
    match ctx.shared.profile {
        Profile::Openstack => vm.openstack().await,
        Profile::Ec2 => vm.ec2_datasource().await,
        Profile::CloudInit => {
            vm.openstack().await;
            vm.crawl("/latest/meta-data/").await;
        }
        Profile::Keepalive => vm.keepalive().await,
    }
    let failed = vm.failed;
    drop(vm);
    {
        let mut st = ctx.stats.borrow_mut();
        if failed {
            st.vms_failed += 1;
            LoopProgress::bump(&ctx.progress().failed);
        } else {
            st.vms_completed += 1;
            st.record_vm(scheduled.elapsed());
            LoopProgress::bump(&ctx.progress().completed);
        }
        st.finished = Some(Instant::now());
    }
    ctx.running.set(ctx.running.get() - 1);
    if ctx.running.get() == 0 {
        ctx.all_done.notify();
    }
}

/// One booting VM.
struct Vm<'a> {
    ctx: &'a LoopCtx,
    i: usize,
    spec: &'a VmSpec,
    /// Kept between requests only in the keep-alive profile.
    conn: Option<Conn>,
    /// Request bytes, reused.
    req: Vec<u8>,
    failed: bool,
}

impl Vm<'_> {
    async fn openstack(&mut self) {
        self.get("/openstack", Check::NonEmpty, false).await;
        self.get("/openstack", Check::NonEmpty, false).await;
        for (leaf, check) in [
            ("meta_data.json", Check::MetaData),
            ("user_data", Check::UserData),
            ("vendor_data.json", Check::Json),
            ("vendor_data2.json", Check::Json),
            ("network_data.json", Check::NetworkData),
        ] {
            let path = format!("/openstack/{OPENSTACK_VERSION}/{leaf}");
            self.get(&path, check, false).await;
        }
    }

    async fn ec2_datasource(&mut self) {
        let ready = Check::Leaf(Leaf::InstanceId);
        self.get("/2009-04-04/meta-data/instance-id", ready, false)
            .await;
        for v in EC2_PROBE_VERSIONS {
            self.get(
                &format!("/{v}/meta-data/instance-id"),
                Check::NotFound,
                false,
            )
            .await;
        }
        self.get("/2009-04-04/user-data", Check::UserData, false)
            .await;
        self.crawl("/2009-04-04/meta-data/").await;
    }

    async fn keepalive(&mut self) {
        let path = format!("/openstack/{OPENSTACK_VERSION}/meta_data.json");
        for _ in 0..KEEPALIVE_REQUESTS {
            self.get(&path, Check::MetaData, true).await;
        }
        self.conn = None;
    }

    /// Depth-first crawl of an EC2 `meta-data/` tree, in listing order.
    async fn crawl(&mut self, root: &str) {
        // Stack of paths still to fetch; directories end in '/'.
        let mut todo: Vec<String> = vec![root.to_owned()];
        let mut fetched = 0;
        while let Some(path) = todo.pop() {
            fetched += 1;
            if fetched > MAX_CRAWL_REQUESTS {
                self.fail(
                    ErrorKind::Body,
                    &path,
                    "crawl exceeds the request bound".into(),
                );
                return;
            }
            if !path.ends_with('/') {
                let name = path.rsplit('/').next().unwrap_or("");
                self.get(&path, Check::Leaf(Leaf::from_name(name)), false)
                    .await;
                continue;
            }
            let Some(listing) = self.get(&path, Check::Listing, false).await else {
                continue;
            };
            let before = todo.len();
            for line in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if line.trim_end_matches('/') == "security-credentials" {
                    continue;
                }
                match line.split_once('=') {
                    // `0=storm-key` → `0/openssh-key`.
                    Some((n, _)) => todo.push(format!("{path}{n}/openssh-key")),
                    None => todo.push(format!("{path}{line}")),
                }
            }
            // Pop in listing order.
            todo[before..].reverse();
        }
    }

    fn fail(&mut self, kind: ErrorKind, path: &str, why: String) {
        self.failed = true;
        LoopProgress::bump(&self.ctx.progress().errors);
        let i = self.i;
        self.ctx
            .stats
            .borrow_mut()
            .record_error(kind, || format!("vm {i} GET {path}: {why}"));
    }

    /// One request. Returns the body as text for listings that passed their
    /// check, `Some("")` for other passes, `None` on failure (counted).
    async fn get(&mut self, path: &str, check: Check, keep: bool) -> Option<String> {
        let ctx = self.ctx;
        let shared = &ctx.shared;
        let (conn, started) = match self.conn.take() {
            Some(c) => (c, Instant::now()),
            None => {
                let permit = ctx.permits.acquire().await;
                let started = Instant::now();
                let deadline = started + shared.timeout;
                let connect = client::connect(shared.target, self.spec.ip, permit);
                ctx.stats.borrow_mut().connections += 1;
                match rt::with_deadline(deadline, connect).await {
                    Ok(Ok(c)) => (c, started),
                    Ok(Err(e)) => {
                        self.fail(ErrorKind::Connect, path, e.to_string());
                        return None;
                    }
                    Err(rt::Elapsed) => {
                        self.fail(ErrorKind::Timeout, path, "connect timed out".into());
                        return None;
                    }
                }
            }
        };
        let deadline = started + shared.timeout;
        client::write_request(path, &mut self.req);
        let mut buf = ctx.pool.take();
        let mut body = ctx.pool.take();
        let res = rt::with_deadline(
            deadline,
            client::exchange(&conn.tcp, &mut self.req, &mut buf, &mut body),
        )
        .await;
        ctx.pool.put(buf);
        {
            let mut st = ctx.stats.borrow_mut();
            st.requests += 1;
        }
        LoopProgress::bump(&ctx.progress().requests);
        let outcome = match res {
            Ok(Ok(resp)) => {
                ctx.stats.borrow_mut().record_request(started.elapsed());
                let verdict = check::check(self.spec, check, resp.status, &body);
                if keep && resp.keep_alive {
                    self.conn = Some(conn);
                } else {
                    drop(conn);
                }
                match verdict {
                    Ok(()) if check == Check::Listing => {
                        Some(String::from_utf8_lossy(&body).into_owned())
                    }
                    Ok(()) => Some(String::new()),
                    Err((kind, why)) => {
                        self.fail(kind, path, why);
                        None
                    }
                }
            }
            Ok(Err(e)) => {
                let kind = match e {
                    ExchangeError::Connect(_) => ErrorKind::Connect,
                    _ => ErrorKind::Io,
                };
                self.fail(kind, path, e.to_string());
                None
            }
            Err(rt::Elapsed) => {
                self.fail(
                    ErrorKind::Timeout,
                    path,
                    format!("no response within {:?}", shared.timeout),
                );
                None
            }
        };
        ctx.pool.put(body);
        outcome
    }
}
