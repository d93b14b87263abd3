//! The `holdfast` binary: a thin CLI over the library. `all-in-one` serves every CSI service
//! for the pools on this node; `ctl` is an operator's CSI client; `bench` measures a running
//! driver; `certs` makes TLS certificates for the Agent API. The only place that uses `anyhow`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use holdfast::config::Config;
use holdfast::driver::Driver;
use holdfast::exec::RealExec;
use holdfast::node::mount::RealMounter;
use holdfast::server::{self, ServeOptions, Services};

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
    /// Make a cluster CA and node certificates for the Agent API's mutual TLS.
    Certs(holdfast::certs::CertsArgs),
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
    /// Controller and Node calls served at once; further calls wait for a free slot (each
    /// within its own deadline). Identity calls (Probe, GetPluginInfo) are never held back.
    #[arg(long, env = "HOLDFAST_MAX_CONCURRENT_CALLS", default_value_t = server::DEFAULT_MAX_CONCURRENT_CALLS as u32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_concurrent_calls: u32,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Writes each log event as exactly one line: a newline or carriage return inside an event (a
/// request's name formatted into a message, a tool's multi-line stderr) is written escaped, so
/// no request can forge a log line, whichever code logged it. The formatter hands over one
/// whole event per `write_all`.
struct OneLine<W>(W);

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(b) => (b, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        if !body.iter().any(|b| matches!(b, b'\n' | b'\r')) {
            return self.0.write_all(buf);
        }
        let mut line = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => line.extend_from_slice(b"\\n"),
                b'\r' => line.extend_from_slice(b"\\r"),
                b => line.push(b),
            }
        }
        line.extend_from_slice(end);
        self.0.write_all(&line)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOLDFAST_LOG").unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| OneLine(std::io::stderr()))
        .with_ansi(std::io::stderr().is_terminal());
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

async fn all_in_one(args: ServeArgs, serve_on: tokio::runtime::Handle) -> anyhow::Result<()> {
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
    let exec = Arc::new(RealExec::with_prefix(cfg.exec_prefix.to_prefix()));
    let mounter = Arc::new(RealMounter::new(exec.clone()));
    let freeze_deadline = std::time::Duration::from_secs(args.freeze_deadline.max(1));
    let driver = Arc::new(Driver::with_freeze_deadline(&node_id, &cfg, &args.state_dir, exec, mounter.clone(), freeze_deadline)?);
    // Before serving: nothing a killed predecessor froze or suspended stays so, and no
    // holding bind of a killed publish pins a volume.
    driver.recover().await;
    mounter.recover().await;
    let options =
        ServeOptions { max_concurrent_calls: args.max_concurrent_calls as usize, serve_on: Some(serve_on), ..ServeOptions::default() };
    server::serve(&args.endpoint, driver, Services { controller: true, node: true }, options, shutdown_signal())
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!("stopped");
    Ok(())
}

/// How long, once serving has stopped, the exit waits for blocking calls still running.
const EXIT_WAIT: Duration = Duration::from_millis(500);

fn main() {
    let cli = Cli::parse();
    let runtime = |name: &str, threads: Option<usize>| {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.thread_name(name).enable_all();
        if let Some(n) = threads {
            b.worker_threads(n);
        }
        b.build().unwrap_or_else(|e| {
            eprintln!("holdfast: cannot start the async runtime: {e}");
            std::process::exit(1);
        })
    };
    // The pools and every Controller/Node call run on `calls`; connections and Identity on
    // `grpc`, which nothing else uses, so Probe answers even when calls block their threads.
    let calls = runtime("holdfast-call", None);
    let mut grpc = None;
    let res = match cli.cmd {
        Command::AllInOne(a) => {
            let handle = grpc.insert(runtime("holdfast-grpc", Some(2))).handle().clone();
            calls.block_on(all_in_one(a, handle))
        }
        Command::Ctl(a) => calls.block_on(holdfast::ctl::run(a)).map_err(anyhow::Error::msg),
        Command::Bench(a) => calls.block_on(holdfast::bench::run(a)).map_err(anyhow::Error::msg),
        Command::Certs(a) => holdfast::certs::run(a).map_err(anyhow::Error::msg),
    };
    // Dropping a runtime would wait for every blocking call, and one stuck in the kernel (a
    // frozen pool filesystem, a hung NFS server) never returns: stop waiting after a moment.
    if let Some(g) = grpc {
        g.shutdown_timeout(EXIT_WAIT);
    }
    calls.shutdown_timeout(EXIT_WAIT);
    if let Err(e) = res {
        eprintln!("holdfast: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn each_log_event_is_one_line() {
        let mut out = OneLine(Vec::new());
        out.write_all(b"INFO created name=a\nINFO forged\r\n").unwrap();
        out.write_all(b"INFO plain\n").unwrap();
        assert_eq!(String::from_utf8(out.0).unwrap(), "INFO created name=a\\nINFO forged\\r\nINFO plain\n");
    }
}
