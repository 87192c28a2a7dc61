//! The `metaproxy` command line. `anyhow` is used here only.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use metaproxy::agent::AgentConfig;
use metaproxy::api::config::ApiConfig;
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
    /// Talk to a running proxy over its control socket (root only).
    Ctl {
        /// The proxy's `control_socket`.
        #[arg(long, default_value = config::DEFAULT_CONTROL_SOCKET)]
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
    /// API, agent and namespace proxy, each on its own pinned loops, wired
    /// together by `[api]`, `[agent]` and `[proxy]` of one file.
    Up {
        /// Configuration file (TOML with `[api]`, `[agent]` and `[proxy]`).
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
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
        Command::Up { config } => run_up(&config),
        Command::Agent { config, check } => run_agent(&config, check),
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
    let file = config::load_file(path)?;
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

/// The three sections of one file must describe one chain.
fn check_chain(api: &ApiConfig, agent: &AgentConfig, proxy: &ProxyConfig) -> Result<()> {
    if proxy.agent_socket != agent.socket {
        bail!(
            "proxy.agent_socket ({}) is not agent.socket ({}): the proxy would not reach this agent",
            proxy.agent_socket.display(),
            agent.socket.display()
        );
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

fn run_up(path: &Path) -> Result<()> {
    let ctx = || format!("refusing to start with {}", path.display());
    let api_cfg = load_api_config(path).with_context(ctx)?;
    let agent_cfg = load_agent_config(path).with_context(ctx)?;
    let proxy_cfg = load_proxy_config(path).with_context(ctx)?;
    check_chain(&api_cfg, &agent_cfg, &proxy_cfg).with_context(ctx)?;
    let try_url = proxy_cfg
        .namespaces
        .first()
        .and_then(|n| n.listen.first())
        .map(|a| format!("curl http://{a}/openstack/latest/meta_data.json"));
    let (ctl_path, discover) = (proxy_cfg.control_socket.clone(), proxy_cfg.discover.clone());
    let signals = metaproxy::signals::block_terminating()?;
    let api = metaproxy::api::server::start(api_cfg).with_context(ctx)?;
    let agent = metaproxy::agent::start(agent_cfg).with_context(ctx)?;
    let proxy = metaproxy::proxy::start(proxy_cfg).with_context(ctx)?;
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
                let _ = api.reload_inventory();
                let _ = agent.reload_inventory();
            }
            metaproxy::signals::Received::Terminate(sig) => {
                log::info(format_args!("{sig}: draining and exiting"));
                break;
            }
        }
    }
    if let Some(w) = watcher {
        w.stop();
    }
    // Front to back, so nothing in flight loses its next hop.
    proxy.stop()?;
    agent.stop()?;
    api.stop()?;
    log::info(format_args!("stopped"));
    Ok(())
}
