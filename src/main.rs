//! The `metaproxy` command line. `anyhow` is used here only.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use metaproxy::config::{self, ProxyConfig};
use metaproxy::log::{self, Level};

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
    /// Boot-storm load generator: N VMs, each from its own source address,
    /// replay cloud-init's requests against TARGET and check every answer.
    /// Exits 1 unless every VM completed without errors.
    Storm {
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
    },
    /// Inventory tools.
    Inventory {
        #[command(subcommand)]
        command: InventoryCmd,
    },
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
        Command::Storm {
            target,
            inventory,
            vms,
            ramp,
            profile,
            workers,
            timeout,
            max_connections,
            json,
        } => {
            let target = resolve(&target)?;
            let inv = metaproxy::inventory::Inventory::load(&inventory)?;
            let mut cfg = metaproxy::storm::StormConfig::new(
                target,
                metaproxy::storm::VmSpec::from_inventory(&inv, vms),
            );
            if cfg.vms.len() < vms {
                log::info(format_args!(
                    "storm: {} has {} VMs with a fixed IPv4 address; running those",
                    inventory.display(),
                    cfg.vms.len()
                ));
            }
            drop(inv);
            cfg.ramp = ramp;
            cfg.profile = profile;
            cfg.timeout = timeout;
            cfg.max_connections = max_connections;
            cfg.progress = true;
            if let Some(w) = workers {
                cfg.workers = w;
            }
            run_storm(cfg, json.as_deref())
        }
        Command::Inventory {
            command:
                InventoryCmd::Synth {
                    vms,
                    networks,
                    routers,
                    out,
                },
        } => run_inventory_synth(vms, networks, routers, out.as_deref()),
    }
}

fn load_proxy_config(path: &Path) -> Result<ProxyConfig> {
    let file = config::load_file(path)?;
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
        println!("{} is valid", path.display());
        return Ok(());
    }
    let signals = metaproxy::signals::block_terminating()?;
    let handle = metaproxy::proxy::start(cfg)?;
    metaproxy::signals::notify_ready();
    let sig = signals.wait_terminate();
    log::info(format_args!("{sig}: draining and exiting"));
    handle.stop()?;
    log::info(format_args!("stopped"));
    Ok(())
}

fn run_inventory_synth(vms: u32, networks: u32, routers: u32, out: Option<&Path>) -> Result<()> {
    use metaproxy::inventory::synth::{synth_toml, SynthSpec};
    let text = synth_toml(&SynthSpec {
        vms,
        networks,
        routers,
    })?;
    match out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => {
            use std::io::Write as _;
            std::io::stdout().lock().write_all(text.as_bytes())?;
        }
    }
    Ok(())
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

fn run_storm(cfg: metaproxy::storm::StormConfig, json: Option<&Path>) -> Result<()> {
    let report = metaproxy::storm::run(cfg)?;
    println!("{report}");
    if let Some(path) = json {
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
