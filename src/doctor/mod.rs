//! `metaproxy doctor`: why can't this VM reach its metadata?
//!
//! Runs, from the network node, every check of the metadata path it can,
//! front to back, and reports each as OK, WARN or FAIL with what to do:
//! the config loads; every configured or discovered namespace has its
//! listener bound; `qrouter-` namespaces redirect 169.254.169.254:80 to the
//! listener and close its port to anything else; the agent's socket answers;
//! Neutron takes the agent's credentials; the metadata API answers and
//! shares the agent's secret; the fd limit covers the namespaces; the agent
//! is registered in Neutron when it reports; and with `--vm`, one request
//! through the whole path as that VM.
//!
//! The doctor is its own short-lived process: blocking std IO with a timeout
//! on every exchange, and the agent's async Neutron and API clients driven by
//! [`crate::rt::block_on`] under [`crate::rt::with_deadline`]. It reuses the
//! daemons' own code for everything that decides an answer (the config
//! conversion, discovery's classification, [`crate::serve::admit::budget_for`],
//! the agent's request writer and signature, the Neutron client), so a check
//! cannot pass where the daemon would fail. The shared secret is used to sign
//! and never printed.
//!
//! Rejected: asking a running proxy over `metaproxy ctl` instead of looking
//! into the namespaces (it shows what the proxy believes, not whether the
//! kernel has the socket or the rules, and it needs the proxy up); spoofing
//! the VM's source address inside the router namespace for `--vm`
//! (IP_TRANSPARENT replies go to the real VM unless policy routing is added
//! to a production namespace): the VM's hop is the listener check plus the
//! rules check, and the rest of the path is driven with the VM's identity
//! exactly as the proxy stamps it.

pub mod netfilter;
pub mod probe;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::agent::config::{Backend, NeutronConfig};
use crate::agent::forward::{self, ApiResponse, GuestRequest};
use crate::agent::identity::{IdText, Identity, LookupKey, Scope};
use crate::agent::resolve::Resolved;
use crate::agent::AgentConfig;
use crate::http::Method;
use crate::proxy::config::{self as proxy_config, NamespaceConfig, NsIdentity, ProxyConfig};

/// Every single exchange (a socket, Neutron, the API) is bounded by this.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Below this many connections per namespace (each namespace's share of the
/// fd budget when all are busy, or its `max_connections`) the fd budget is
/// a WARN: cloud-init holds one connection per booting VM, so this is the
/// number of VMs behind one router that can boot at once without waiting.
pub const MIN_CONNECTIONS_PER_NAMESPACE: usize = 64;
/// What the API is asked for in the secret and `--vm` checks.
const PROBE_TARGET: &str = "/openstack/latest/meta_data.json";

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Works.
    Ok,
    /// Works, but something is off or could not be checked.
    Warn,
    /// Broken: some VM does not get its metadata.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What was checked (`listener qrouter-…`, `shared secret`, …).
    pub name: String,
    /// The verdict.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do (empty when OK).
    pub hint: String,
}

impl Check {
    fn new(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status,
            detail: detail.into(),
            hint: String::new(),
        }
    }
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check::new(name, Status::Ok, detail)
    }
    fn warn(name: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Warn, detail).hint(hint)
    }
    fn fail(name: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> Check {
        Check::new(name, Status::Fail, detail).hint(hint)
    }
    fn hint(mut self, hint: impl Into<String>) -> Check {
        self.hint = hint.into();
        self
    }
}

/// What to check.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only this namespace (a name under the netns dir or a path).
    pub namespace: Option<String>,
    /// Send one request through the whole path as the VM with this address
    /// (needs `namespace`).
    pub vm: Option<IpAddr>,
}

/// The report as text: one line per check, `STATUS name: detail; fix: hint`.
pub fn render_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let status = match c.status {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        let _ = write!(out, "{status:<4} {}: {}", c.name, one_line(&c.detail));
        if !c.hint.is_empty() {
            let _ = write!(out, "; fix: {}", one_line(&c.hint));
        }
        out.push('\n');
    }
    out
}

/// `s` with every run of whitespace or control characters as one space:
/// details quote peers' answers, and a report line must stay one line.
fn one_line(s: &str) -> String {
    s.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The text of an error page (tags dropped), at most 200 bytes of it.
fn page_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(600)]);
    let mut out = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    let mut out = one_line(&out);
    if out.len() > 200 {
        let mut end = 200;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// Whether any check failed (the exit status).
pub fn any_failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

/// Run every check for the config file at `path`.
pub fn run(path: &Path, opts: &Options) -> Vec<Check> {
    let mut out = Vec::new();
    let (proxy, agent) = load(path, &mut out);
    if let Some(proxy) = &proxy {
        let all = namespaces(proxy, &Options::default(), &mut out);
        let namespaces = match &opts.namespace {
            Some(_) => namespaces(proxy, opts, &mut Vec::new()),
            None => all.clone(),
        };
        if opts.namespace.is_some() && namespaces.is_empty() {
            // Said once, with the hint.
            namespaces_missing(opts, &mut out);
        }
        for ns in &namespaces {
            out.push(listener(ns));
            if is_router_ns(proxy, ns) {
                out.extend(router_rules(ns));
            }
        }
        out.push(fd_budget(path, proxy, &all));
    }
    // A running `metaproxy up` runs the agent on the proxy's loops: there
    // is no socket to probe, and its keys are not used.
    let up = running_daemon(path)
        .map(|(pid, _)| pid)
        .filter(|&pid| runs_up(pid));
    let socket = agent
        .as_ref()
        .map(|a| a.socket.clone())
        .or_else(|| proxy.as_ref().map(|p| p.agent_socket.clone()))
        .filter(|_| up.is_none());
    if let Some(pid) = up {
        out.push(Check::ok(
            "agent socket",
            format!(
                "none: `metaproxy up` (pid {pid}) runs the agent in-process, on the proxy's loops"
            ),
        ));
    } else if let (Some(p), Some(a)) = (&proxy, &agent) {
        if p.agent_socket != a.socket {
            out.push(Check::fail(
                "agent socket path",
                format!(
                    "proxy.agent_socket is {} but agent.socket is {}",
                    p.agent_socket.display(),
                    a.socket.display()
                ),
                "make both the same path",
            ));
        }
    }
    if let Some(sock) = &socket {
        out.push(agent_socket(sock));
    }
    if let Some(agent) = &agent {
        out.push(backend(agent));
        out.extend(api_and_secret(agent));
        out.push(registration(agent));
    }
    if let Some(check) = nova_schema(path) {
        out.push(check);
    }
    if let Some(ip) = opts.vm {
        out.extend(vm_path(
            proxy.as_ref(),
            agent.as_ref(),
            socket.as_deref(),
            opts,
            ip,
        ));
    }
    out
}

/// With `[api] source = "nova"`: connect to Nova's databases as the API
/// would at start, check their alembic versions and tables, and count the
/// instances (`metaproxy api --check`). `None` without such an `[api]`.
fn nova_schema(path: &Path) -> Option<Check> {
    let cfg = match crate::api::config::load(path) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => return None,
        Err(e) => {
            return Some(Check::fail(
                "config [api]",
                e.to_string(),
                "`metaproxy api --check` names the key",
            ))
        }
    };
    let crate::api::config::ApiSource::Nova(n) = &cfg.source else {
        return None;
    };
    Some(match crate::api::server::start_nova(n, &cfg) {
        Ok((source, report)) => {
            source.stop();
            let versions: Vec<String> = report
                .versions
                .iter()
                .map(|(db, v)| format!("{db} at {v}"))
                .collect();
            let total: i64 = report.instances.iter().map(|(_, n)| n).sum();
            Check::ok(
                "nova schema",
                format!(
                    "{}; {total} instance(s) in {} cell database(s)",
                    versions.join(", "),
                    report.instances.len()
                ),
            )
        }
        Err(e) => Check::fail(
            "nova schema",
            e.to_string(),
            "the API refuses to start on this database: check [api.nova] connection and \
             api_connection, and that Nova's release is one the API supports (docs/nova-source.md)",
        ),
    })
}

/// Load `[proxy]` and `[agent]` of `path` as the daemons would; a broken
/// section is a FAIL, a missing one leaves its checks out.
fn load(path: &Path, out: &mut Vec<Check>) -> (Option<ProxyConfig>, Option<AgentConfig>) {
    let file = match proxy_config::load_file(path) {
        Ok(f) => f,
        Err(e) => {
            out.push(Check::fail(
                "config",
                format!("{}: {e}", path.display()),
                "fix the file; `metaproxy up --check` names the key",
            ));
            return (None, None);
        }
    };
    let proxy = file.proxy.as_ref().map(ProxyConfig::try_from);
    let agent = file.agent.as_ref().map(AgentConfig::try_from);
    let mut sections = Vec::new();
    let proxy = match proxy {
        Some(Ok(p)) => {
            sections.push(format!(
                "[proxy] with {} static namespace(s), discovery {}",
                p.namespaces.len(),
                if p.discover.is_some() { "on" } else { "off" }
            ));
            Some(p)
        }
        Some(Err(e)) => {
            out.push(Check::fail(
                "config [proxy]",
                e.to_string(),
                "`metaproxy proxy --check` names the key",
            ));
            None
        }
        None => None,
    };
    let agent = match agent {
        Some(Ok(a)) => {
            sections.push(format!(
                "[agent] with backend {}",
                match a.backend {
                    Backend::Inventory(_) => "inventory",
                    Backend::Neutron(_) => "neutron",
                    Backend::Ovn(_) => "ovn",
                }
            ));
            Some(a)
        }
        Some(Err(e)) => {
            out.push(Check::fail(
                "config [agent]",
                e.to_string(),
                "`metaproxy agent --check` names the key",
            ));
            None
        }
        None => None,
    };
    if file.api.is_some() {
        sections.push("[api]".to_owned());
    }
    if proxy.is_none() && agent.is_none() && file.api.is_none() && out.is_empty() {
        out.push(Check::fail(
            "config",
            format!("{}: neither [proxy], [agent] nor [api]", path.display()),
            "point --config at the network node's file (/etc/metaproxy/metaproxy.toml)",
        ));
    } else if !sections.is_empty() {
        out.insert(
            0,
            Check::ok(
                "config",
                format!("{}: {}", path.display(), sections.join(", ")),
            ),
        );
    }
    (proxy, agent)
}

/// The static namespaces and, with discovery on, those in the netns
/// directory that discovery would serve; only `opts.namespace` if given.
fn namespaces(proxy: &ProxyConfig, opts: &Options, out: &mut Vec<Check>) -> Vec<NamespaceConfig> {
    let mut all = proxy.namespaces.clone();
    if let Some(d) = &proxy.discover {
        match std::fs::read_dir(&d.dir) {
            Ok(rd) => {
                let mut found: Vec<NamespaceConfig> = rd
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_str()?.to_string();
                        let (identity, listen) = d.classify(&name)?;
                        Some(NamespaceConfig {
                            netns: Some(d.dir.join(&name)),
                            name,
                            identity,
                            listen,
                        })
                    })
                    .filter(|n| !all.iter().any(|s| s.netns == n.netns))
                    .collect();
                found.sort_by(|a, b| a.name.cmp(&b.name));
                all.extend(found);
            }
            Err(e) => out.push(Check::fail(
                "discovery",
                format!("cannot read {}: {e}", d.dir.display()),
                "run the doctor as root on the network node",
            )),
        }
    }
    let Some(want) = &opts.namespace else {
        return all;
    };
    let matches = |n: &NamespaceConfig| {
        n.name == *want
            || n.netns.as_deref() == Some(Path::new(want))
            || n.netns.as_deref().and_then(Path::file_name) == Some(std::ffi::OsStr::new(want))
    };
    all.into_iter().filter(matches).collect()
}

fn namespaces_missing(opts: &Options, out: &mut Vec<Check>) {
    if let Some(want) = &opts.namespace {
        out.push(Check::fail(
            format!("namespace {want}"),
            "not served by this config: no [[proxy.namespace]] names it and discovery does not match it",
            "add it to [[proxy.namespace]], or check [proxy.discover] prefixes and that `ip netns` lists it",
        ));
    }
}

fn is_router_ns(proxy: &ProxyConfig, ns: &NamespaceConfig) -> bool {
    let prefix = proxy
        .discover
        .as_ref()
        .map_or("qrouter-", |d| d.router_prefix.as_str());
    let base = ns
        .netns
        .as_deref()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .unwrap_or(&ns.name);
    base.starts_with(prefix)
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every listen address of `ns` has a LISTEN socket inside it.
fn listener(ns: &NamespaceConfig) -> Check {
    let name = format!("listener {}", ns.name);
    match probe::listening(ns.netns.as_deref()) {
        Err(e) => Check::fail(
            name,
            e.to_string(),
            "run as root; check the namespace exists (`ip netns`)",
        ),
        Ok(bound) => {
            let missing: Vec<SocketAddr> = ns
                .listen
                .iter()
                .copied()
                .filter(|a| !probe::is_bound(*a, &bound))
                .collect();
            if missing.is_empty() {
                Check::ok(name, format!("listening on {}", list(&ns.listen)))
            } else {
                Check::fail(
                    name,
                    format!("nothing listens on {}", list(&missing)),
                    format!(
                        "start metaproxy-proxy (`systemctl status metaproxy-proxy`; \
                         `journalctl -u metaproxy-proxy | grep {}` says why a bind failed)",
                        ns.name
                    ),
                )
            }
        }
    }
}

/// In a router namespace whose listener is not on port 80 itself: the
/// REDIRECT of 169.254.169.254:80 to it and the INPUT rule closing its port.
fn router_rules(ns: &NamespaceConfig) -> Vec<Check> {
    let (redirect, input_name) = (
        format!("redirect {}", ns.name),
        format!("input rule {}", ns.name),
    );
    if ns
        .listen
        .iter()
        .any(|a| a.port() == 80 && (a.ip().is_unspecified() || a.ip() == IpAddr::V4(METADATA_V4)))
    {
        return vec![Check::ok(
            redirect,
            "not needed: the listener is on port 80 itself",
        )];
    }
    let Some(port) = ns.listen.first().map(SocketAddr::port) else {
        return Vec::new();
    };
    let netns = ns.netns.as_deref();
    let save = probe::run_in(netns, "iptables-save", &[]);
    let nft = probe::run_in(netns, "nft", &["list", "ruleset"]);
    let mut errors = Vec::new();
    let mut seen = Vec::new();
    let mut has_redirect = false;
    let mut input = netfilter::InputRule::Missing;
    let better = |a: netfilter::InputRule, b: netfilter::InputRule| {
        use netfilter::InputRule::{DropsRedirected, Missing, Ok};
        match (a, b) {
            (Ok, _) | (_, Ok) => Ok,
            (DropsRedirected, _) | (_, DropsRedirected) => DropsRedirected,
            (Missing, Missing) => Missing,
        }
    };
    match &save {
        Ok(Some(text)) => {
            seen.push("iptables-save");
            has_redirect |= netfilter::iptables_has_redirect(text, port);
            input = better(input, netfilter::iptables_input_rule(text, port));
        }
        Ok(None) => {}
        Err(e) => errors.push(format!("iptables-save: {e}")),
    }
    match &nft {
        Ok(Some(text)) => {
            seen.push("nft");
            has_redirect |= netfilter::nft_has_redirect(text, port);
            input = better(input, netfilter::nft_input_rule(text, port));
        }
        Ok(None) => {}
        Err(e) => errors.push(format!("nft: {e}")),
    }
    if seen.is_empty() {
        let why = if errors.is_empty() {
            "neither iptables-save nor nft is installed".to_string()
        } else {
            errors.join("; ")
        };
        return vec![Check::warn(
            redirect,
            format!("cannot read the rules: {why}"),
            "install iptables or nftables, or check by hand: `ip netns exec <ns> iptables -t nat -S`",
        )];
    }
    let from = seen.join(" and ");
    vec![
        if has_redirect {
            Check::ok(redirect, format!("169.254.169.254:80 -> {port} ({from})"))
        } else {
            Check::fail(
                redirect,
                format!("no REDIRECT of 169.254.169.254:80 to {port} ({from}): VMs behind this router get no answer"),
                format!(
                    "add it: `ip netns exec {} iptables -t nat -A PREROUTING -d 169.254.169.254/32 -i qr-+ -p tcp -m tcp --dport 80 -j REDIRECT --to-ports {port}`, \
                     or run /usr/libexec/metaproxy/qrouter-metadata-rules.sh (docs/migrating-from-neutron.md, step 2)",
                    ns.name
                ),
            )
        },
        match input {
            netfilter::InputRule::Ok => {
                Check::ok(input_name, format!("port {port} is dropped unless redirected ({from})"))
            }
            netfilter::InputRule::DropsRedirected => Check::fail(
                input_name,
                format!("port {port} is dropped before redirected (marked) traffic is accepted ({from}): VMs behind this router get no answer"),
                "put the ACCEPT of `-m mark --mark 0x1/0xffff` before the DROP, or make the DROP `-m mark ! --mark 0x1/0xffff`",
            ),
            netfilter::InputRule::Missing => Check::fail(
                input_name,
                format!("no INPUT rule dropping port {port} ({from}): the listener is reachable on the router's other addresses"),
                format!(
                    "add it: `ip netns exec {} iptables -A INPUT -p tcp -m tcp --dport {port} -m mark ! --mark 0x1/0xffff -j DROP` \
                     (or run qrouter-metadata-rules.sh)",
                    ns.name
                ),
            ),
        },
    ]
}

const METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// The fd limit of the proxy that serves `path` (running, else this
/// process's hard limit, which a proxy started from here raises to) against
/// what the namespaces may hold; the budget is [`crate::serve::admit::budget_for`].
fn fd_budget(path: &Path, proxy: &ProxyConfig, all: &[NamespaceConfig]) -> Check {
    use crate::serve::admit;
    let name = "fd budget";
    let (limit, whose) = match running_daemon(path) {
        Some((pid, limit)) => (limit, format!("the running proxy (pid {pid})")),
        None => match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            Ok((_, hard)) => (
                hard,
                "this shell's hard limit (no running proxy found for this config; a unit's \
                 LimitNOFILE may differ)"
                    .to_string(),
            ),
            Err(e) => return Check::warn(name, format!("getrlimit: {e}"), ""),
        },
    };
    let budget = admit::budget_for(limit);
    let reserve = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(budget);
    let namespaces = all.len();
    // Every loop holds a dup of every listener.
    let listeners: usize = proxy.workers.get() * all.iter().map(|n| n.listen.len()).sum::<usize>();
    let per_ns = proxy.max_connections.get().min(budget / namespaces.max(1));
    let detail = format!(
        "RLIMIT_NOFILE {limit} of {whose}: {budget} client connections, {per_ns} per namespace \
         when all {namespaces} are busy (max_connections {})",
        proxy.max_connections
    );
    let hint = "raise LimitNOFILE in the proxy's unit (or `ulimit -n`)";
    if listeners > reserve || budget < namespaces {
        Check::fail(
            name,
            format!("{detail}; the listeners alone ({listeners} fds) exceed the {reserve} kept for them, so accept fails with EMFILE"),
            hint,
        )
    } else if per_ns < MIN_CONNECTIONS_PER_NAMESPACE {
        Check::warn(
            name,
            format!("{detail}: below {MIN_CONNECTIONS_PER_NAMESPACE}, a boot storm behind one router waits in the listen backlog"),
            hint,
        )
    } else {
        Check::ok(name, detail)
    }
}

/// A running `metaproxy proxy|up` with `--config` naming `path`: (pid, its
/// soft RLIMIT_NOFILE, which the daemon raised to its hard limit at start).
fn running_daemon(path: &Path) -> Option<(u32, u64)> {
    let want = std::fs::canonicalize(path).ok()?;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is_ours = args
            .first()
            .and_then(|a| std::str::from_utf8(a).ok())
            .is_some_and(|a| a.ends_with("metaproxy"))
            && args.iter().any(|a| *a == b"proxy" || *a == b"up");
        if !is_ours {
            continue;
        }
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
        let names_it = args.windows(2).any(|w| {
            (w[0] == b"--config" || w[0] == b"-c")
                && std::str::from_utf8(w[1])
                    .ok()
                    .and_then(|p| std::fs::canonicalize(cwd.join(p)).ok())
                    .is_some_and(|p| p == want)
        });
        if !names_it {
            continue;
        }
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let soft = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))?
            .split_whitespace()
            .nth(3)?
            .parse()
            .ok()?;
        return Some((pid, soft));
    }
    None
}

/// Whether process `pid` is `metaproxy up` (its first argument after the
/// options is the subcommand; `--log-level` takes a value).
fn runs_up(pid: u32) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmd.split(|&b| b == 0).skip(1);
    while let Some(a) = args.next() {
        if a == b"--log-level" {
            args.next();
        } else if !a.starts_with(b"-") {
            return a == b"up";
        }
    }
    false
}

fn unix_connect(sock: &Path) -> Result<UnixStream, String> {
    let s = UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(CHECK_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(CHECK_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// The agent's socket accepts and answers (a request without identity
/// headers: the agent's 400 is the expected answer).
fn agent_socket(sock: &Path) -> Check {
    let name = "agent socket";
    let req = b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n";
    match unix_connect(sock).and_then(|mut s| probe::exchange(&mut s, req, false)) {
        Ok(r) => Check::ok(
            name,
            format!(
                "{} answered {} to a request without identity headers",
                sock.display(),
                r.head.status
            ),
        ),
        Err(e) => Check::fail(
            name,
            e,
            "start the agent (`systemctl status metaproxy-agent` or neutron-metadata-agent); the proxy answers 503 meanwhile",
        ),
    }
}

/// Drive an agent client future on a fresh loop, bounded by [`CHECK_TIMEOUT`].
fn drive<T>(f: impl std::future::Future<Output = T>) -> Result<T, String> {
    // The timer is made inside the loop: it needs a running runtime.
    let deadline = std::time::Instant::now() + CHECK_TIMEOUT;
    match crate::rt::block_on(async move { crate::rt::with_deadline(deadline, f).await }) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        Err(e) => Err(format!("cannot start an event loop: {e}")),
    }
}

fn neutron_get(
    cfg: &NeutronConfig,
    path: &str,
) -> Result<Vec<u8>, crate::agent::neutron::BackendError> {
    use crate::agent::neutron::{BackendError, NeutronClient};
    let client = NeutronClient::new(cfg, Default::default());
    drive(client.get(path, crate::agent::metrics::Call::Ports))
        .unwrap_or_else(|e| Err(BackendError::Unreachable("Neutron", e)))
}

/// The backend answers: Neutron takes the credentials, or the inventory loads.
fn backend(agent: &AgentConfig) -> Check {
    use crate::agent::neutron::BackendError;
    match &agent.backend {
        Backend::Inventory(path) => match crate::inventory::Inventory::load(path) {
            Ok(inv) => Check::ok(
                "backend inventory",
                format!(
                    "{}: {} instance(s)",
                    path.display(),
                    inv.instances().count()
                ),
            ),
            Err(e) => Check::fail(
                "backend inventory",
                e.to_string(),
                "fix the inventory file; the agent keeps its last good copy until then",
            ),
        },
        Backend::Neutron(cfg) => {
            let name = "neutron";
            let keystone = !matches!(cfg.auth, crate::agent::config::NeutronAuth::NoAuth);
            match neutron_get(cfg, "/v2.0/ports?limit=1&fields=id") {
                Ok(_) => Check::ok(
                    name,
                    format!(
                        "{}GET /v2.0/ports answered at {}",
                        if keystone { "Keystone issued a token, " } else { "" },
                        cfg.endpoint.addr
                    ),
                ),
                Err(BackendError::Status("Keystone", s @ (401 | 403), _)) => Check::fail(
                    name,
                    format!("Keystone refused the agent's credentials ({s})"),
                    "check [agent.neutron] username, password, project_name and the domains (or the application credential)",
                ),
                Err(BackendError::Status("Neutron", s @ (401 | 403), m)) => Check::fail(
                    name,
                    format!("Neutron refused the token ({s}): {m}"),
                    "give the agent's user the role neutron-metadata-agent has (service or admin)",
                ),
                Err(e) => Check::fail(
                    name,
                    e.to_string(),
                    "check [agent.neutron] url / auth_url and that neutron-server and Keystone are up and reachable from this node",
                ),
            }
        }
        // Never read from a file: only `metaproxy ovn` builds it.
        Backend::Ovn(r) => Check::ok("backend ovn", format!("{r:?}")),
    }
}

/// A GET of `target` to the API signed for `instance` as the agent signs it.
fn api_request(
    agent: &AgentConfig,
    instance: &str,
    project: &str,
    xff: IpAddr,
) -> Result<ApiResponse, String> {
    let resolved = Resolved::new(instance, project).map_err(|e| format!("{e:?}"))?;
    let text = |s: &str| IdText::new(s).ok_or_else(|| format!("{s:?} is no identity text"));
    let id = Identity {
        scope: Scope::Router(text(&crate::agent::report::uuid4(false))?),
        key: LookupKey::Ip(xff),
        xff: text(&xff.to_string())?,
    };
    let guest = GuestRequest {
        method: Method::Get,
        target: PROBE_TARGET.as_bytes(),
        token: None,
        body: b"",
    };
    let mut req = Vec::new();
    forward::write_api_request(
        &mut req,
        &guest,
        &agent.nova.host_header(),
        &id,
        &resolved,
        &crate::sign::Signer::new(agent.shared_secret.as_bytes()),
    )
    .map_err(|e| format!("{e:?}"))?;
    let pool = forward::Pool::new(agent.nova.addr, 1, agent.nova.timeout.min(CHECK_TIMEOUT))
        .with_tls(agent.nova.tls.clone());
    drive(pool.request(&req, false))?.map_err(|e| format!("{e:?}"))
}

/// The API answers, and a request signed for a random instance is a 404
/// (the secrets agree) rather than a 403 (they differ).
fn api_and_secret(agent: &AgentConfig) -> Vec<Check> {
    let (api, secret) = ("metadata API", "shared secret");
    let addr = format!("{}:{}", agent.nova.host, agent.nova.port);
    let random = crate::agent::report::uuid4(false);
    let project = crate::agent::report::uuid4(true);
    match api_request(agent, &random, &project, IpAddr::V4(Ipv4Addr::LOCALHOST)) {
        Err(e) => vec![
            Check::fail(
                api,
                format!("{addr}: {e}"),
                "check [agent.nova] nova_metadata_host/port/protocol and that nova-api-metadata (or `metaproxy api`) is up",
            ),
            Check::warn(secret, "not checked: the API did not answer", "fix the API first"),
        ],
        Ok(r) => {
            let status = r.head.status;
            let api_ok = Check::ok(api, format!("{addr} answered {status}"));
            let secret_check = match status {
                404 => Check::ok(
                    secret,
                    "the API accepted the agent's signature (404 for a random instance)",
                ),
                403 => Check::fail(
                    secret,
                    "the API rejected the agent's signature (403): the secrets differ",
                    "set the same metadata_proxy_shared_secret in [agent], in Nova's [neutron] (or [api]), then restart both",
                ),
                s => Check::warn(
                    secret,
                    format!("not decided: the API answered {s} (expected 404 or 403)"),
                    "is [agent.nova] pointing at the metadata API, with service_metadata_proxy on?",
                ),
            };
            vec![api_ok, secret_check]
        }
    }
}

#[derive(serde::Deserialize)]
struct AgentRow {
    #[serde(default)]
    alive: bool,
    #[serde(default)]
    heartbeat_timestamp: Option<String>,
}

#[derive(serde::Deserialize)]
struct AgentsBody {
    agents: Vec<AgentRow>,
}

/// With `[agent] transport_url`: Neutron lists this host's `Metadata agent`, alive.
fn registration(agent: &AgentConfig) -> Check {
    let name = "agent registration";
    let Some(report) = &agent.report else {
        return Check::ok(
            name,
            "not checked: reporting is off ([agent] transport_url unset)",
        );
    };
    let host = &report.host;
    let Backend::Neutron(cfg) = &agent.backend else {
        return Check::warn(
            name,
            "not checked: with backend \"inventory\" the doctor has no Neutron credentials",
            format!("`openstack network agent list --agent-type metadata --host {host}`"),
        );
    };
    let path = format!(
        "/v2.0/agents?agent_type=Metadata%20agent&host={}",
        encode(host)
    );
    match neutron_get(cfg, &path) {
        Err(e) => Check::warn(
            name,
            format!("cannot list agents: {e}"),
            "listing agents needs an admin or service role; check by hand with `openstack network agent list`",
        ),
        Ok(body) => match serde_json::from_slice::<AgentsBody>(&body) {
            Err(e) => Check::warn(name, format!("unusable answer from Neutron: {e}"), ""),
            Ok(b) => match b.agents.first() {
                // Not a FAIL: Neutron's policy filters agents out of the
                // list for a user without the admin role, which is what an
                // agent's service user usually has.
                None => Check::warn(
                    name,
                    format!(
                        "Neutron lists no Metadata agent on host {host} to this user (unregistered, \
                         or the user may not see agents: that needs the admin role)"
                    ),
                    "`openstack network agent list --agent-type metadata --host <host>` as admin; if it is missing there, \
                     check the agent's log for `report_state` errors, [agent] transport_url and host (Neutron's [DEFAULT] host)",
                ),
                Some(a) if a.alive => Check::ok(
                    name,
                    format!(
                        "Metadata agent on {host} is alive (last heartbeat {})",
                        a.heartbeat_timestamp.as_deref().unwrap_or("unknown")
                    ),
                ),
                Some(a) => Check::fail(
                    name,
                    format!(
                        "Metadata agent on {host} is down (last heartbeat {})",
                        a.heartbeat_timestamp.as_deref().unwrap_or("unknown")
                    ),
                    "is the agent running? its log says why reports fail (broker unreachable, credentials)",
                ),
            },
        },
    }
}

#[derive(serde::Deserialize)]
struct MetaData {
    uuid: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    project_id: Option<String>,
}

/// `--vm IP --namespace NAME`: the namespace's listener answers, the agent
/// resolves the VM (the request as the proxy stamps it), and the API serves
/// the instance it resolved to.
fn vm_path(
    proxy: Option<&ProxyConfig>,
    agent: Option<&AgentConfig>,
    socket: Option<&Path>,
    opts: &Options,
    vm: IpAddr,
) -> Vec<Check> {
    let mut out = Vec::new();
    let Some(ns_name) = &opts.namespace else {
        out.push(Check::fail(
            "vm",
            "--vm needs --namespace",
            "name the VM's router or network namespace",
        ));
        return out;
    };
    let Some(proxy) = proxy else {
        out.push(Check::fail("vm", "no [proxy] section", ""));
        return out;
    };
    let mut ignored = Vec::new();
    let Some(ns) = namespaces(proxy, opts, &mut ignored).into_iter().next() else {
        out.push(Check::fail(
            format!("vm {vm}"),
            format!("{ns_name} is not served by this config"),
            "",
        ));
        return out;
    };
    // Hop 1: the proxy in the namespace answers HTTP.
    out.push(vm_listener_hop(&ns, vm));
    // Hop 2: the agent resolves the VM as the proxy asks it to.
    let Some(sock) = socket else {
        return out;
    };
    let (hop, resolved) = vm_agent_hop(sock, &ns.identity, vm);
    out.push(hop);
    // Hop 3: the API serves the resolved instance to a request signed for it.
    if let (Some(agent), Some(md)) = (agent, resolved) {
        let name = format!("vm {vm} api");
        let project = md.project_id.clone().unwrap_or_default();
        out.push(match api_request(agent, &md.uuid, &project, vm) {
            Ok(r) if r.head.status == 200 => {
                Check::ok(name, format!("200 for instance {}", md.uuid))
            }
            Ok(r) => Check::fail(
                name,
                format!("{} for instance {}", r.head.status, md.uuid),
                "see the API's log for this instance",
            ),
            Err(e) => Check::fail(name, e, "the metadata API check above says more"),
        });
    }
    out
}

fn vm_listener_hop(ns: &NamespaceConfig, vm: IpAddr) -> Check {
    let name = format!("vm {vm} listener");
    let Some(&want) = ns.listen.first() else {
        return Check::fail(name, "the namespace has no listen address", "");
    };
    let target = if want.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), want.port())
    } else {
        want
    };
    let req = format!(
        "GET {PROBE_TARGET} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
    );
    let r = crate::rt::netns::in_namespace(ns.netns.as_deref(), || {
        let mut s = probe::connect_marked(target, CHECK_TIMEOUT)?;
        probe::exchange(&mut s, req.as_bytes(), false).map_err(std::io::Error::other)
    });
    match r {
        Ok(r) if r.head.status >= 500 => Check::fail(
            name,
            format!(
                "{target} in {} answered {} {}",
                ns.name,
                r.head.status,
                page_text(&r.payload())
            ),
            "the proxy does not reach the agent: see the agent socket check and the proxy's log",
        ),
        Ok(r) => Check::ok(
            name,
            format!(
                "the proxy on {target} in {} answered {} (marked as redirected traffic; a 404 is \
                 expected, the probe comes from the namespace's own address, not the VM's)",
                ns.name, r.head.status
            ),
        ),
        Err(e) => Check::fail(
            name,
            format!("{target} in {}: {e}", ns.name),
            "see the listener check above; is metaproxy-proxy running?",
        ),
    }
}

fn vm_agent_hop(sock: &Path, identity: &NsIdentity, vm: IpAddr) -> (Check, Option<MetaData>) {
    use crate::http::{put_header, HeaderName, HeaderValue};
    let name = format!("vm {vm} agent");
    let xff = vm.to_string();
    let mut req = format!("GET {PROBE_TARGET} HTTP/1.1\r\n").into_bytes();
    let headers = [
        ("Host", "169.254.169.254"),
        ("X-Forwarded-For", xff.as_str()),
        (identity.header_name(), identity.id()),
        ("Connection", "close"),
    ];
    for (n, v) in headers {
        match (
            HeaderName::new(n.as_bytes()),
            HeaderValue::new(v.as_bytes()),
        ) {
            (Ok(n), Ok(v)) => put_header(&mut req, n, v),
            _ => return (Check::fail(name, format!("unusable header {n}"), ""), None),
        }
    }
    req.extend_from_slice(b"\r\n");
    match unix_connect(sock).and_then(|mut s| probe::exchange(&mut s, &req, false)) {
        Err(e) => (
            Check::fail(name, e, "see the agent socket check above"),
            None,
        ),
        Ok(r) if r.head.status == 200 => match serde_json::from_slice::<MetaData>(&r.payload()) {
            Ok(md) => (
                Check::ok(
                    name,
                    format!(
                        "X-Forwarded-For {vm} with {} {} resolved to instance {} ({})",
                        identity.header_name(),
                        identity.id(),
                        md.uuid,
                        md.hostname.as_deref().unwrap_or("no hostname")
                    ),
                ),
                Some(md),
            ),
            Err(e) => (
                Check::fail(name, format!("200 but not meta_data.json: {e}"), ""),
                None,
            ),
        },
        Ok(r) => {
            let text = page_text(&r.payload());
            let hint = match r.head.status {
                404 => format!("no instance has {vm} behind {}: check the VM's port in Neutron (`openstack port list --fixed-ip ip-address={vm}`)", identity.id()),
                403 => "the API rejected the signature: see the shared secret check".to_string(),
                _ => "see the agent's log".to_string(),
            };
            (
                Check::fail(name, format!("{} {}", r.head.status, text.trim()), hint),
                None,
            )
        }
    }
}

/// Percent-encode a query value (a host name is usually safe already).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
