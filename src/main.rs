//! The `metaproxy` command line. `anyhow` is used here only.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use metaproxy::agent::AgentConfig;
use metaproxy::api::config::ApiConfig;
use metaproxy::config;
use metaproxy::log::{self, Level};
use metaproxy::proxy::config::{self as proxy_config, ProxyConfig};

/// OpenStack's metadata path in one binary: namespace proxy, metadata agent, metadata API.
#[derive(Parser, Debug)]
#[command(name = "metaproxy", version, about, long_about = None)]
struct Cli {
    /// Log level on stderr.
    #[arg(long, global = true, value_enum, default_value = "info")]
    log_level: Level,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Namespace metadata proxy: serve 169.254.169.254 in every configured
    /// router/network namespace and relay to the metadata agent's Unix socket.
    Proxy {
        /// Configuration file (TOML; see the README's reference).
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Validate the configuration, print the effective settings and exit.
        #[arg(long)]
        check: bool,
    },
    /// Talk to a running proxy over its control socket (root only).
    Ctl {
        /// The proxy's `control_socket`.
        #[arg(long, default_value = proxy_config::DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Nova-compatible metadata API: serve the EC2 and OpenStack trees from
    /// the inventory to the metadata agent (or, in direct mode, to guests).
    /// SIGHUP reloads the inventory; so does changing the file.
    Api {
        /// Configuration file (TOML; the `[api]` section is used).
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Validate the configuration and the inventory, print the effective
        /// settings and exit.
        #[arg(long)]
        check: bool,
    },
    /// All three on loopback in one process (the embedded default): metadata
    /// API, agent and namespace proxy, wired together by `[api]`, `[agent]`
    /// and `[proxy]` of one file. The agent and the API stages run on the
    /// proxy's loops, with no socket between the three (`agent.socket`,
    /// `proxy.agent_socket` and `agent.workers` are not used): the agent
    /// hands the API its signed request on the same thread, and the API
    /// still checks the signature. The API also serves `api.listen` on loops
    /// of its own, for other agents and operators.
    Up {
        /// Configuration file (TOML with `[api]`, `[agent]` and `[proxy]`).
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Validate all three sections, the inventory and how they are wired
        /// together (API address, shared secret), then exit.
        #[arg(long)]
        check: bool,
    },
    /// Metadata agent: serve the proxies' Unix socket, resolve each guest,
    /// sign its instance id and forward to the metadata API.
    Agent {
        /// Configuration file (TOML; the `[agent]` section).
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Validate the configuration, print the effective settings and exit.
        #[arg(long)]
        check: bool,
    },
    /// Boot-storm load generator: N VMs, each from its own source address,
    /// replay cloud-init's requests against TARGET and check every answer.
    /// Exits 1 unless every VM completed without errors.
    Storm(StormArgs),
    /// Why can't a VM reach its metadata? Check the path from this network
    /// node: each namespace's listener, the qrouter- REDIRECT and INPUT
    /// rules, the agent's socket, Neutron and its credentials, the metadata
    /// API and the shared secret (never printed), the fd budget, the agent's
    /// registration in Neutron, and with --vm one request as that VM. One
    /// line per check (OK, WARN or FAIL and what to do); exits 1 if any
    /// check fails. Run as root (it enters the namespaces).
    Doctor {
        /// Configuration file (TOML; `[proxy]` and `[agent]` are used).
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Check only this namespace (a name under the netns dir, or a path).
        #[arg(long)]
        namespace: Option<String>,
        /// Also send one request through the whole path as the VM with this
        /// address, and print the instance it resolved to (needs --namespace).
        #[arg(long, requires = "namespace")]
        vm: Option<std::net::IpAddr>,
        /// Print the checks as a JSON array of {name, status, detail, hint}.
        #[arg(long)]
        json: bool,
    },
    /// Inventory tools.
    Inventory {
        #[command(subcommand)]
        command: InventoryCmd,
    },
    /// Debugging: build a compute node's replica of the OVN Southbound DB
    /// (localports, this chassis' ports, datapaths, its Chassis and
    /// Chassis_Private rows, SB_Global) as `metaproxy ovn` does,
    /// and print it with its (network, IP) and (network, MAC) indexes as
    /// JSON. Serves nothing and writes nothing.
    #[command(name = "ovn-dump-replica")]
    OvnDumpReplica(OvnDumpArgs),
    /// OVN compute-node metadata service: create and serve every
    /// ovnmeta-<network> namespace in place of neutron-ovn-metadata-agent
    /// (or neutron-ovn-agent's metadata extension) and its haproxies.
    ///
    /// Keeps a replica of the OVN Southbound database (this chassis is the
    /// local Open_vSwitch DB's external_ids:system-id). For every network
    /// with a VM port bound to this chassis it creates ovnmeta-<network>
    /// (veth tap<net[:10]>0/1, the metadata port's MAC, MTU and addresses,
    /// 169.254.169.254, the OVS port with iface-id on the OVN bridge), and
    /// removes it after the last one leaves; at start, and again every 60 s
    /// and after every Southbound change. It serves 169.254.169.254 (and
    /// fe80::a9fe:a9fe, after DAD) in every ovnmeta-<network> namespace. A
    /// VM is the one bound Port_Binding of that network with its IP (or,
    /// link-local, its MAC); its neutron:device_id and neutron:project_id
    /// are sent to the Nova metadata API as X-Instance-ID and X-Tenant-ID,
    /// with X-Instance-ID-Signature and X-Forwarded-For; no port or several
    /// is a 404. Once the first provisioning pass is done and its
    /// namespaces are served (also with none), this chassis' liveness keys
    /// are written in Chassis_Private, as the agent does after its sync.
    /// With a [proxy] netns_dir other than /run/netns (where `ip netns`
    /// creates namespaces) nothing is provisioned: the namespaces found
    /// there are served. SIGTERM/SIGINT drain and exit.
    Ovn {
        /// Configuration file (TOML: `[ovn]` in Neutron's option names,
        /// optional `[proxy]` for the listeners' limits, timeouts and IMDSv2).
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
        /// Validate the configuration, print the effective settings and
        /// exit, connecting to nothing.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Args, Debug)]
struct OvnDumpArgs {
    /// Read the OVSDB settings from this file's `[ovn]` section
    /// (`ovn_sb_connection`, the three `ovn_sb_*` TLS files,
    /// `ovsdb_probe_interval`, `ovsdb_connection_timeout`, `[ovn.ovs]`
    /// `ovsdb_connection`), instead of the flags below. The whole section is
    /// validated, as `metaproxy ovn` does.
    #[arg(long, conflicts_with_all = ["ovn_sb_connection", "ovsdb_connection", "ovn_sb_private_key", "ovn_sb_certificate", "ovn_sb_ca_cert"])]
    config: Option<PathBuf>,
    /// With `--config`: validate the whole `[ovn]` section, print
    /// `FILE is valid` and exit, connecting to nothing.
    #[arg(long, requires = "config")]
    check: bool,
    /// `[ovn] ovn_sb_connection`: comma-separated `tcp:`, `ssl:` or `unix:` remotes, tried in turn.
    #[arg(long, required_unless_present = "config")]
    ovn_sb_connection: Option<String>,
    /// `[ovs] ovsdb_connection`: the local Open_vSwitch DB, whose
    /// `external_ids:system-id` names this chassis.
    #[arg(long, default_value = "tcp:127.0.0.1:6640")]
    ovsdb_connection: String,
    /// The chassis name, instead of reading `system-id`.
    #[arg(long)]
    chassis: Option<String>,
    /// `[ovn] ovn_sb_private_key` (for `ssl:`).
    #[arg(long)]
    ovn_sb_private_key: Option<PathBuf>,
    /// `[ovn] ovn_sb_certificate` (for `ssl:`).
    #[arg(long)]
    ovn_sb_certificate: Option<PathBuf>,
    /// `[ovn] ovn_sb_ca_cert` (for `ssl:`).
    #[arg(long)]
    ovn_sb_ca_cert: Option<PathBuf>,
    /// Give up after this many seconds without a snapshot (also the
    /// connect timeout, `ovsdb_connection_timeout`, unless `--config`
    /// sets it).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Subcommand, Debug)]
enum CtlCommand {
    /// Namespaces, listeners, open connections and per-namespace counters.
    Status,
}

fn main() {
    let cli = Cli::parse();
    log::set_level(cli.log_level);
    if let Err(e) = run(cli) {
        log::error(format_args!("{e:#}"));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Proxy { config, check } => run_proxy(&config, check),
        Command::Ctl { socket, command } => {
            let cmd = match command {
                CtlCommand::Status => "status",
            };
            print!("{}", metaproxy::proxy::control::ctl_request(&socket, cmd)?);
            Ok(())
        }
        Command::Api { config, check } => run_api(&config, check),
        Command::Up { config, check } => run_up(&config, check),
        Command::Agent { config, check } => run_agent(&config, check),
        Command::Storm(args) => run_storm(args),
        Command::Inventory { command } => run_inventory(command),
        Command::Doctor {
            config,
            namespace,
            vm,
            json,
        } => run_doctor(&config, namespace, vm, json),
        Command::OvnDumpReplica(args) => run_ovn_dump(args),
        Command::Ovn { config, check } => run_ovn(&config, check),
    }
}

fn run_doctor(
    path: &Path,
    namespace: Option<String>,
    vm: Option<std::net::IpAddr>,
    json: bool,
) -> Result<()> {
    let opts = metaproxy::doctor::Options { namespace, vm };
    let checks = metaproxy::doctor::run(path, &opts);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        print!("{}", metaproxy::doctor::render_text(&checks));
    }
    if metaproxy::doctor::any_failed(&checks) {
        std::process::exit(1);
    }
    Ok(())
}

fn run_ovn_dump(a: OvnDumpArgs) -> Result<()> {
    use metaproxy::ovn::ovsdb::{read_local_chassis, tls_config, ConnOptions, Remote, TlsFiles};
    use metaproxy::ovn::replica::{SbConfig, SbMonitor};
    let limit = std::time::Duration::from_secs(a.timeout.max(1));
    let (remotes, conn, ovs, ovs_conn) = match &a.config {
        Some(path) => {
            let file = metaproxy::config::load_file(path)?;
            let Some(t) = file.ovn.as_ref() else {
                bail!("{}: no [ovn] section", path.display());
            };
            let f = metaproxy::ovn::config::OvnFile::from_table(t)
                .and_then(|f| {
                    // Validate the whole section, then keep its OVSDB part.
                    metaproxy::ovn::config::OvnConfig::try_from(&f)?;
                    metaproxy::ovn::config::OvsdbSettings::try_from(&f)
                })
                .with_context(|| format!("refusing {}", path.display()))?;
            if a.check {
                println!("{} is valid", path.display());
                return Ok(());
            }
            // Give up at --timeout even when the file's connect timeout is
            // longer (a connect in progress would hold the exit until then).
            let (mut sb_conn, mut ovs_conn) = (f.sb_conn, f.ovs_conn);
            sb_conn.connect_timeout = sb_conn.connect_timeout.min(limit);
            ovs_conn.connect_timeout = ovs_conn.connect_timeout.min(limit);
            (f.sb_remotes, sb_conn, f.ovs_remote, ovs_conn)
        }
        None => {
            let sb = a.ovn_sb_connection.as_deref().unwrap_or_default();
            let remotes = Remote::parse_list(sb).context("--ovn-sb-connection")?;
            let mut conn = ConnOptions {
                connect_timeout: limit,
                probe_interval: std::time::Duration::ZERO,
                ..ConnOptions::default()
            };
            match (a.ovn_sb_private_key, a.ovn_sb_certificate, a.ovn_sb_ca_cert) {
                (Some(private_key), Some(certificate), Some(ca_cert)) => {
                    conn.tls = Some(tls_config(&TlsFiles {
                        private_key,
                        certificate,
                        ca_cert,
                    })?);
                }
                (None, None, None) => {}
                _ => anyhow::bail!(
                    "--ovn-sb-private-key, --ovn-sb-certificate and --ovn-sb-ca-cert go together"
                ),
            }
            let ovs = Remote::parse(&a.ovsdb_connection).context("--ovsdb-connection")?;
            let ovs_conn = conn.clone();
            (remotes, conn, ovs, ovs_conn)
        }
    };
    let chassis = match a.chassis {
        Some(c) => c,
        None => {
            read_local_chassis(&ovs, &ovs_conn)
                .context("reading the chassis name from the local Open_vSwitch DB")?
                .0
        }
    };
    let monitor = SbMonitor::start(SbConfig {
        remotes,
        conn,
        chassis,
    })?;
    let t0 = std::time::Instant::now();
    while !monitor.shared().stats().synced {
        if t0.elapsed() >= limit {
            let why = monitor.shared().stats().last_error.unwrap_or_default();
            anyhow::bail!("no Southbound snapshot within {}s: {why}", limit.as_secs());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let dump = monitor.shared().snapshot().dump();
    drop(monitor);
    println!("{}", serde_json::to_string_pretty(&dump)?);
    Ok(())
}

fn run_ovn(path: &Path, check: bool) -> Result<()> {
    use metaproxy::ovn::serve::{load, OvnServe};
    let ctx = || format!("refusing to start with {}", path.display());
    let cfg = load(path).with_context(ctx)?;
    // The shared secret is redacted by OvnConfig's Debug.
    log::info(format_args!("effective ovn config: {:?}", cfg.ovn));
    if check {
        println!("{:#?}\n{:#?}", cfg.ovn, cfg.proxy);
        println!("{} is valid", path.display());
        return Ok(());
    }
    let signals = metaproxy::signals::block_terminating()?;
    let serve = OvnServe::start(cfg).with_context(ctx)?;
    metaproxy::signals::notify_ready();
    loop {
        match signals.wait() {
            metaproxy::signals::Received::Terminate(sig) => {
                log::info(format_args!("{sig}: draining and exiting"));
                break;
            }
            metaproxy::signals::Received::Reload => log::info(format_args!(
                "SIGHUP: nothing to reload (the replica follows the Southbound database)"
            )),
        }
    }
    serve.stop()?;
    log::info(format_args!("stopped"));
    Ok(())
}

fn load_proxy_config(path: &Path) -> Result<ProxyConfig> {
    let file = proxy_config::load_file(path)?;
    let Some(p) = file.proxy.as_ref() else {
        bail!("{}: no [proxy] section", path.display());
    };
    Ok(ProxyConfig::try_from(p)?)
}

fn run_proxy(path: &Path, check: bool) -> Result<()> {
    let cfg = load_proxy_config(path)
        .with_context(|| format!("refusing to start with {}", path.display()))?;
    log::info(format_args!("effective proxy config: {cfg:?}"));
    if check {
        print_warnings(&proxy_agent_warnings(path, &cfg)?);
        println!("{} is valid", path.display());
        return Ok(());
    }
    let signals = metaproxy::signals::block_terminating()?;
    let ctl_path = cfg.control_socket.clone();
    let discover = cfg.discover.clone();
    let handle = metaproxy::proxy::start(cfg)?;
    let _ctl = match metaproxy::proxy::control::serve_ctl(&ctl_path, handle.control.clone()) {
        Ok(c) => Some(c),
        Err(e) => {
            log::warn(format_args!(
                "control socket {} unavailable: {e}; `metaproxy ctl` will not work",
                ctl_path.display()
            ));
            None
        }
    };
    let watcher = match discover {
        Some(d) => Some(metaproxy::proxy::discover::start(
            d,
            handle.control.clone(),
        )?),
        None => None,
    };
    metaproxy::signals::notify_ready();
    loop {
        match signals.wait() {
            metaproxy::signals::Received::Terminate(sig) => {
                log::info(format_args!("{sig}: draining and exiting"));
                break;
            }
            metaproxy::signals::Received::Reload => match load_proxy_config(path) {
                Ok(new) => log::info(format_args!("SIGHUP: {}", handle.control.reload(new))),
                Err(e) => log::error(format_args!(
                    "SIGHUP: keeping the running configuration: {e:#}"
                )),
            },
        }
    }
    if let Some(w) = watcher {
        w.stop();
    }
    handle.stop()?;
    log::info(format_args!("stopped"));
    Ok(())
}

fn load_api_config(path: &Path) -> Result<ApiConfig> {
    // The whole file first, as the proxy's and the agent's loaders read it:
    // unknown sections and a malformed `[proxy]` are refused by every daemon.
    proxy_config::load_file(path)?;
    match metaproxy::api::config::load(path)? {
        Some(cfg) => Ok(cfg),
        None => bail!("{}: no [api] section", path.display()),
    }
}

fn run_api(path: &Path, check: bool) -> Result<()> {
    let cfg = load_api_config(path)
        .with_context(|| format!("refusing to start with {}", path.display()))?;
    log::info(format_args!("effective api config: {cfg:?}"));
    if check {
        print_warnings(&cfg.warnings());
        if let metaproxy::api::config::ApiSource::Nova(n) = &cfg.source {
            // Connect, check the alembic versions and the tables, count.
            let (source, report) = metaproxy::api::server::start_nova(n, &cfg)
                .with_context(|| format!("refusing to start with {}", path.display()))?;
            source.stop();
            for (db, v) in &report.versions {
                println!("{db}: Nova schema version {v}");
            }
            let total: i64 = report.instances.iter().map(|(_, n)| n).sum();
            for (db, count) in &report.instances {
                println!("{db}: {count} instance(s)");
            }
            println!(
                "{} is valid ({total} instance(s) in {} cell database(s))",
                path.display(),
                report.instances.len()
            );
            return Ok(());
        }
        let inv = metaproxy::inventory::Inventory::load(&cfg.inventory)
            .with_context(|| format!("refusing to start with {}", path.display()))?;
        println!(
            "{} is valid ({} instance(s) in {})",
            path.display(),
            inv.instances().count(),
            cfg.inventory.display()
        );
        return Ok(());
    }
    let signals = metaproxy::signals::block_terminating()?;
    let handle = metaproxy::api::server::start(cfg)
        .with_context(|| format!("refusing to start with {}", path.display()))?;
    metaproxy::signals::notify_ready();
    loop {
        match signals.wait() {
            metaproxy::signals::Received::Reload => {
                log::info(format_args!("SIGHUP: reloading the inventory"));
                // A broken file keeps the running inventory; the error is logged.
                let _ = handle.reload_inventory();
            }
            metaproxy::signals::Received::Terminate(sig) => {
                log::info(format_args!("{sig}: draining and exiting"));
                break;
            }
        }
    }
    handle.stop()?;
    log::info(format_args!("stopped"));
    Ok(())
}

fn load_agent_config(path: &Path) -> Result<AgentConfig> {
    let file = proxy_config::load_file(path)?;
    let Some(a) = file.agent.as_ref() else {
        bail!("{}: no [agent] section", path.display());
    };
    Ok(AgentConfig::try_from(a)?)
}

fn run_agent(path: &Path, check: bool) -> Result<()> {
    let cfg = load_agent_config(path)
        .with_context(|| format!("refusing to start with {}", path.display()))?;
    // The secret is redacted by AgentConfig's Debug.
    log::info(format_args!("effective agent config: {cfg:?}"));
    if check {
        print_warnings(&cfg.warnings());
        println!("{} is valid", path.display());
        return Ok(());
    }
    let signals = metaproxy::signals::block_terminating()?;
    let handle = metaproxy::agent::start(cfg)?;
    metaproxy::signals::notify_ready();
    loop {
        match signals.wait() {
            metaproxy::signals::Received::Reload => {
                log::info(format_args!("SIGHUP: reloading the inventory"));
                // A broken file keeps the running inventory; the error is logged.
                let _ = handle.reload_inventory();
            }
            metaproxy::signals::Received::Terminate(sig) => {
                log::info(format_args!("{sig}: draining and exiting"));
                break;
            }
        }
    }
    handle.stop()?;
    log::info(format_args!("stopped"));
    Ok(())
}

/// Proxy limits above the agent's. The proxy alone cannot know the agent it
/// will talk to: it compares with this file's `[agent]` section when there
/// is one (a network node's file usually configures both), else with the
/// agent's defaults, and says which.
fn proxy_agent_warnings(path: &Path, proxy: &ProxyConfig) -> Result<Vec<String>> {
    let file = proxy_config::load_file(path)?;
    let (agent, whose) = match &file.agent {
        Some(t) => (
            metaproxy::agent::config::AgentFile::from_table(t)?.limits()?,
            "this file's [agent.limits]",
        ),
        None => (
            metaproxy::agent::config::DEFAULT_AGENT_LIMITS,
            "the agent's defaults; this file has no [agent] section",
        ),
    };
    Ok(metaproxy::agent::config::proxy_limit_warnings(
        &proxy.limits,
        &agent,
        whose,
    ))
}

/// `--check`'s report of settings that are accepted but unsafe.
fn print_warnings(warnings: &[String]) {
    for w in warnings {
        println!("warning: {w}");
    }
}

/// Everything `up --check` warns about.
fn up_warnings(api: &ApiConfig, agent: &AgentConfig, proxy: &ProxyConfig) -> Vec<String> {
    [
        api.warnings(),
        agent.warnings(),
        metaproxy::agent::config::proxy_limit_warnings(
            &proxy.limits,
            &agent.limits,
            "[agent.limits]",
        ),
    ]
    .concat()
}

/// The three sections of one file must describe one chain, and one in
/// which every guest keeps its own identity end to end: the proxy stamps the
/// guest's address, the agent resolves it to an instance and signs that,
/// and the API serves the signed instance. Refused:
/// - `api.service_metadata_proxy = false`: the API would identify guests by
///   their TCP peer, which inside `up` is always the agent, so every guest
///   would be served as whichever instance owns the agent's address (and
///   its password POST stored on it);
/// - the agent resolving from another inventory file than the API serves:
///   the instance the agent signs for an address is then not the one the
///   API's file gives that address (a stale copy hands a VM another's data).
fn check_chain(api: &ApiConfig, agent: &AgentConfig) -> Result<()> {
    if !api.service_metadata_proxy {
        bail!(
            "api.service_metadata_proxy = false: inside `up` the API's TCP peer is always the agent, \
             so every guest would be served as the instance that owns the agent's address; \
             `up` needs service_metadata_proxy = true (a standalone `metaproxy api` may identify guests by peer)"
        );
    }
    if let (
        metaproxy::agent::config::Backend::Inventory(_),
        metaproxy::api::config::ApiSource::Nova(_),
    ) = (&agent.backend, &api.source)
    {
        bail!(
            "agent.inventory with api.source = \"nova\": the agent would resolve guests from a file \
             and the API serve them from Nova's databases; use the agent's Neutron backend"
        );
    }
    if let metaproxy::agent::config::Backend::Inventory(agent_inv) = &agent.backend {
        let same = |a: &Path, b: &Path| {
            a == b
                || matches!(
                    (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                    (Ok(x), Ok(y)) if x == y
                )
        };
        if !same(agent_inv, &api.inventory) {
            bail!(
                "agent.inventory ({}) is not api.inventory ({}): the agent would sign, for a guest's \
                 address, an instance the API's file may give to another guest",
                agent_inv.display(),
                api.inventory.display()
            );
        }
    }
    let nova = agent.nova.addr;
    if !api
        .listen
        .iter()
        .any(|a| *a == nova || (a.port() == nova.port() && a.ip().is_unspecified()))
    {
        bail!("agent.nova ({nova}) is not one of api.listen ({:?}): the agent would not reach this API", api.listen);
    }
    if api.shared_secret != agent.shared_secret {
        bail!("agent.metadata_proxy_shared_secret differs from api.metadata_proxy_shared_secret: every request would get 403");
    }
    Ok(())
}

fn run_up(path: &Path, check: bool) -> Result<()> {
    let ctx = || format!("refusing to start with {}", path.display());
    let api_cfg = load_api_config(path).with_context(ctx)?;
    let agent_cfg = load_agent_config(path).with_context(ctx)?;
    let proxy_cfg = load_proxy_config(path).with_context(ctx)?;
    check_chain(&api_cfg, &agent_cfg).with_context(ctx)?;
    if check {
        println!("{api_cfg:#?}\n{agent_cfg:#?}\n{proxy_cfg:#?}");
        print_warnings(&up_warnings(&api_cfg, &agent_cfg, &proxy_cfg));
        if let metaproxy::api::config::ApiSource::Nova(n) = &api_cfg.source {
            let (source, report) =
                metaproxy::api::server::start_nova(n, &api_cfg).with_context(ctx)?;
            source.stop();
            let total: i64 = report.instances.iter().map(|(_, n)| n).sum();
            println!(
                "{} is valid for `up` ({total} instance(s) in Nova's databases)",
                path.display()
            );
            return Ok(());
        }
        let inv = metaproxy::inventory::Inventory::load(&api_cfg.inventory)
            .with_context(|| format!("inventory {}", api_cfg.inventory.display()))
            .with_context(ctx)?;
        println!(
            "{} is valid for `up` ({} instance(s) in {})",
            path.display(),
            inv.instances().count(),
            api_cfg.inventory.display()
        );
        return Ok(());
    }
    let try_url = proxy_cfg
        .namespaces
        .first()
        .and_then(|n| n.listen.first())
        .map(|a| format!("curl http://{a}/openstack/latest/meta_data.json"));
    let (ctl_path, discover) = (proxy_cfg.control_socket.clone(), proxy_cfg.discover.clone());
    let signals = metaproxy::signals::block_terminating()?;
    for w in metaproxy::agent::config::proxy_limit_warnings(
        &proxy_cfg.limits,
        &agent_cfg.limits,
        "[agent.limits]",
    ) {
        log::warn(format_args!("{w}"));
    }
    // One inventory for both (check_chain made sure they name the same
    // file), loaded once and watched by one thread.
    let inventory = match agent_cfg.backend {
        metaproxy::agent::config::Backend::Inventory(_) => Some(std::sync::Arc::new(
            metaproxy::api::server::load_store(&api_cfg.inventory).with_context(ctx)?,
        )),
        metaproxy::agent::config::Backend::Neutron(_)
        | metaproxy::agent::config::Backend::Ovn(_) => None,
    };
    let inventory_watch = match &inventory {
        Some(s) => Some(
            metaproxy::inventory::store::Watcher::start(
                s.clone(),
                metaproxy::inventory::store::POLL_INTERVAL,
                "inventory-watch",
            )
            .with_context(ctx)?,
        ),
        None => None,
    };
    // The agent and the API stages run on the proxy's own loops: no agent
    // socket, no loops of the agent's own, no TCP hop from the agent to the
    // API (see `proxy::upstream::Upstream`, `agent::link::ApiLink`). The
    // API's loops still serve `api.listen` for anyone else; its access log
    // names the agent's address as the in-process requests' peer, as the
    // TCP connection would have.
    let loops = proxy_cfg.workers.get();
    let agent_ip = match agent_cfg.nova.addr.ip() {
        ip if ip.is_unspecified() => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        ip => ip,
    };
    let (api, api_stage) =
        metaproxy::api::server::start_in_process(api_cfg, inventory.clone(), loops, agent_ip)
            .with_context(ctx)?;
    let agent = metaproxy::agent::start_in_process(agent_cfg, inventory.clone(), loops)
        .with_context(ctx)?;
    let link = metaproxy::proxy::upstream::AgentLink::InProcess(
        agent.stage().with_api_in_process(api_stage),
    );
    let proxy = metaproxy::proxy::start_with(proxy_cfg, link).with_context(ctx)?;
    let _ctl = metaproxy::proxy::control::serve_ctl(&ctl_path, proxy.control.clone())
        .map_err(|e| {
            log::warn(format_args!(
                "control socket {}: {e}; `metaproxy ctl` will not work",
                ctl_path.display()
            ))
        })
        .ok();
    let watcher = match discover {
        Some(d) => Some(metaproxy::proxy::discover::start(d, proxy.control.clone())?),
        None => None,
    };
    metaproxy::signals::notify_ready();
    log::info(format_args!(
        "up: api, agent and proxy are serving{}",
        try_url.map(|u| format!("; try: {u}")).unwrap_or_default()
    ));
    loop {
        match signals.wait() {
            metaproxy::signals::Received::Reload => {
                match load_proxy_config(path) {
                    Ok(new) => log::info(format_args!("SIGHUP: {}", proxy.control.reload(new))),
                    Err(e) => log::error(format_args!(
                        "SIGHUP: keeping the running proxy configuration: {e:#}"
                    )),
                }
                // Logged by the store either way; one reload for both daemons.
                let _ = match &inventory {
                    Some(s) => s.reload(),
                    None => api.reload_inventory(),
                };
            }
            metaproxy::signals::Received::Terminate(sig) => {
                log::info(format_args!("{sig}: draining and exiting"));
                break;
            }
        }
    }
    if let Some(w) = inventory_watch {
        w.stop();
    }
    if let Some(w) = watcher {
        w.stop();
    }
    // Front to back, so nothing in flight loses its next hop.
    proxy.stop()?;
    agent.stop();
    api.stop()?;
    log::info(format_args!("stopped"));
    Ok(())
}

#[derive(Args, Debug)]
struct StormArgs {
    /// Where the VMs send requests (proxy, `up`, haproxy): HOST:PORT.
    #[arg(long)]
    target: String,
    /// Inventory the VMs come from (see `inventory synth`); each VM binds
    /// its first fixed IPv4.
    #[arg(long)]
    inventory: PathBuf,
    /// Number of VMs (the first N instances of the inventory).
    #[arg(long, default_value_t = metaproxy::storm::DEFAULT_VMS)]
    vms: usize,
    /// Window over which the VMs start (open loop): 5s, 500ms, 1m.
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    ramp: std::time::Duration,
    /// cloud-init | openstack | ec2 | keepalive.
    #[arg(long, default_value = "cloud-init")]
    profile: metaproxy::storm::Profile,
    /// Pinned loops (default: one per core).
    #[arg(long)]
    workers: Option<std::num::NonZeroUsize>,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
    timeout: std::time::Duration,
    /// Cap on open connections (default: from RLIMIT_NOFILE).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum InventoryCmd {
    /// Write a synthetic inventory for boot storms: VM i on 127.16.0.0/12,
    /// hostname vm-<i>, everything else derived from i.
    Synth {
        /// Number of VMs.
        #[arg(long, default_value_t = 1000)]
        vms: u32,
        /// Number of networks the VMs are dealt over.
        #[arg(long, default_value_t = 1)]
        networks: u32,
        /// Number of routers; each takes a share of the networks.
        #[arg(long, default_value_t = 1)]
        routers: u32,
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    config::parse_duration(s).ok_or_else(|| format!("{s:?}: expected e.g. 5s, 500ms, 2m"))
}

fn resolve(target: &str) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs as _;
    target
        .to_socket_addrs()
        .with_context(|| format!("resolving {target}"))?
        .next()
        .with_context(|| format!("{target}: no address"))
}

fn run_storm(a: StormArgs) -> Result<()> {
    let target = resolve(&a.target)?;
    let inv = metaproxy::inventory::Inventory::load(&a.inventory)?;
    let vms = metaproxy::storm::VmSpec::from_inventory(&inv, a.vms);
    drop(inv);
    if vms.len() < a.vms {
        log::info(format_args!(
            "storm: {} has {} VMs with a fixed IPv4 address; running those",
            a.inventory.display(),
            vms.len()
        ));
    }
    let mut cfg = metaproxy::storm::StormConfig::new(target, vms);
    cfg.ramp = a.ramp;
    cfg.profile = a.profile;
    cfg.timeout = a.timeout;
    cfg.max_connections = a.max_connections;
    cfg.progress = true;
    if let Some(w) = a.workers {
        cfg.workers = w;
    }
    let report = metaproxy::storm::run(cfg)?;
    println!("{report}");
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.passed {
        bail!(
            "storm failed: {} of {} VMs completed, {} errors ({} wrong VM)",
            report.vms_completed,
            report.vms,
            report.errors.total(),
            report.errors.wrong_vm
        );
    }
    Ok(())
}

fn run_inventory(cmd: InventoryCmd) -> Result<()> {
    use metaproxy::inventory::synth::{synth_toml, SynthSpec};
    let InventoryCmd::Synth {
        vms,
        networks,
        routers,
        out,
    } = cmd;
    let text = synth_toml(&SynthSpec {
        vms,
        networks,
        routers,
    })?;
    match out {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => {
            use std::io::Write as _;
            std::io::stdout().lock().write_all(text.as_bytes())?;
        }
    }
    Ok(())
}
