//! The `ferry` command line: the agent (`ferry run`) and the operator's tools.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{capture, config::NodeConfig, daemon};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a sidecarless service-mesh data plane, one agent per node"
)]
struct Cli {
    /// Log format of the agent.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run {
        #[arg(long, default_value_os_t = daemon::default_config())]
        config: PathBuf,
    },
    /// Remove everything the agent attached on this node (links, pinned maps). Stop the agent first.
    Uninstall {
        #[arg(long, default_value_os_t = daemon::default_config())]
        config: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Uninstall { config } => uninstall(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(config: PathBuf) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(daemon::run(&config))?;
    Ok(())
}

fn uninstall(config: PathBuf) -> anyhow::Result<()> {
    let cfg = NodeConfig::load(&config)?;
    let removed = capture::uninstall(&cfg)?;
    println!(
        "removed {} pinned objects under {}",
        removed.len(),
        cfg.bpffs_root.display()
    );
    Ok(())
}
