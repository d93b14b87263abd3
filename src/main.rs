//! The `holdfast` binary: a thin CLI over the library. `all-in-one` serves every CSI service
//! for the pools on this node; `ctl` is an operator's CSI client; `bench` measures a running
//! driver. The only place that uses `anyhow`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use holdfast::config::Config;
use holdfast::driver::Driver;
use holdfast::exec::RealExec;
use holdfast::node::mount::RealMounter;
use holdfast::server::{self, Services};

#[derive(Parser, Debug)]
#[command(name = "holdfast", version, about = "CSI storage driver: volumes from LVM, ZFS, NFS and file pools")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve Identity, Controller and Node for this node's pools on one socket.
    AllInOne(ServeArgs),
    /// An operator's CSI client: create, stage, publish, list… against any CSI socket.
    Ctl(holdfast::ctl::CtlArgs),
    /// Measure a running driver against the raw tools.
    Bench(holdfast::bench::BenchArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Where to serve CSI: unix:///path/csi.sock (or tcp://127.0.0.1:PORT for tests).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///run/holdfast/csi.sock")]
    endpoint: String,
    /// This node's id, reported to the orchestrator and part of every volume id (default: the hostname).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// The configuration file (TOML). Without it, one `file` pool named "default" in /var/lib/holdfast/default.
    #[arg(long, env = "HOLDFAST_CONFIG")]
    config: Option<PathBuf>,
    /// The driver's own state (stage and freeze records): created 0700 if missing. Must be on
    /// the node's disk and survive restarts of the driver (in a container: a hostPath).
    #[arg(long, env = "HOLDFAST_STATE_DIR", default_value = "/var/lib/holdfast/state")]
    state_dir: PathBuf,
    /// The longest a filesystem stays frozen for a snapshot or clone (seconds): past it the
    /// copy is stopped, the filesystem thawed and the call fails DEADLINE_EXCEEDED.
    #[arg(long, env = "HOLDFAST_FREEZE_DEADLINE", default_value_t = holdfast::node::freeze::FROZEN_DEADLINE.as_secs())]
    freeze_deadline: u64,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG").unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn default_config() -> Config {
    Config::parse("[[pool]]\nname = \"default\"\nkind = \"file\"\npath = \"/var/lib/holdfast/default\"\n")
        .expect("built-in config is valid")
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the driver with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down: finishing in-flight calls");
}

async fn all_in_one(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => default_config(),
    };
    let node_id = match args.node_id {
        Some(n) => n,
        None => hostname::get().context("cannot read the hostname; pass --node-id")?.to_string_lossy().into_owned(),
    };
    if cfg.pools.is_empty() {
        bail!("the configuration names no pool: add a [[pool]] table");
    }
    let exec = Arc::new(RealExec);
    let mounter = Arc::new(RealMounter::new(exec.clone()));
    let freeze_deadline = std::time::Duration::from_secs(args.freeze_deadline.max(1));
    let driver = Arc::new(Driver::with_freeze_deadline(&node_id, &cfg, &args.state_dir, exec, mounter, freeze_deadline)?);
    // Before serving: nothing a killed predecessor froze or suspended stays so.
    driver.recover().await;
    server::serve(&args.endpoint, driver, Services { controller: true, node: true }, shutdown_signal())
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!("stopped");
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Command::AllInOne(a) => all_in_one(a).await,
        Command::Ctl(a) => holdfast::ctl::run(a).await.map_err(anyhow::Error::msg),
        Command::Bench(a) => holdfast::bench::run(a).await.map_err(anyhow::Error::msg),
    };
    if let Err(e) = res {
        eprintln!("holdfast: {e:#}");
        std::process::exit(1);
    }
}
