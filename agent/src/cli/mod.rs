//! The `ferry` command line: the agent (`ferry run`) and the operator's tools.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

mod table;

use crate::{
    admin::{self, api::Request},
    capture,
    config::NodeConfig,
    daemon,
    identity::{self, Identity, TrustDomain},
};

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
        /// This node's name, overriding the config's `node` (on Kubernetes: the downward API's
        /// `spec.nodeName`, so one ConfigMap serves every node).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Load this eBPF object instead of the built-in one (testing a capture upgrade).
        #[arg(long, hide = true)]
        ebpf_object: Option<PathBuf>,
        /// Threads carrying connections. One thread avoids waking a second one for every event,
        /// which costs more per request here than it gains.
        #[arg(long, env = "FERRY_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        worker_threads: u16,
    },
    /// Certificate authority material: the trust-domain root and per-node intermediates.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The running agent: version, node, uptime, programs, pods, certificates, config generation.
    Status(Target),
    /// Workloads the agent knows, with identities and whether they are enrolled here.
    Workloads(Target),
    /// Live connections: workloads, identities, bytes each way, age.
    Conns(Target),
    /// Workload certificates this agent holds.
    Certs(Target),
    /// Authorization policies in force.
    Policies(Target),
    /// Why a connection would be allowed or denied.
    Explain {
        /// Source: a SPIFFE id or `namespace/pod`.
        #[arg(long)]
        from: String,
        /// Destination: `namespace/pod:port`.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        target: Target,
    },
    /// Offline checks of policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The node config the agent runs with.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Remove everything the agent attached on this node (links, pinned maps). Stop the agent first.
    Uninstall {
        #[arg(long, default_value_os_t = daemon::default_config())]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check AuthorizationPolicy files (a file or a directory): errors exit 1, warnings are listed.
    Lint {
        path: PathBuf,
        #[arg(long, default_value = crate::policy::DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the parsed node config.
    Dump(Target),
}

/// Which agent to ask, and how to print its answer.
#[derive(clap::Args, Clone)]
struct Target {
    /// The agent's admin socket (default: from --config, else /run/ferry/admin.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// A node config to read the admin socket path from.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `table` for people, `json` for scripts (stable schema).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a trust domain's root CA (root.pem, root.key) in a new directory.
    Init {
        #[arg(long)]
        trust_domain: TrustDomain,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "3650d", value_parser = duration)]
        validity: Duration,
    },
    /// Issue a node's intermediate CA (node.pem, node.key, bundle.pem), path length 0.
    IssueNode {
        /// Directory of the root CA (from `ferry ca init`).
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "365d", value_parser = duration)]
        validity: Duration,
    },
    /// Mint a workload certificate and key from a node directory, for a peer that is not a Ferry agent
    /// (e.g. an Istio-style HBONE peer under test). Agents mint their own.
    IssueWorkload {
        /// Directory of the node intermediate (from `ferry ca issue-node`).
        #[arg(long)]
        node_dir: PathBuf,
        #[arg(long)]
        identity: Identity,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "24h", value_parser = duration)]
        ttl: Duration,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration (a number followed by s, m, h or d)"))
}

fn ca(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init {
            trust_domain,
            out,
            validity,
        } => {
            let files = identity::ca_init(&trust_domain, &out, validity)?;
            println!("root CA for {trust_domain}: {}", files.cert.display());
        }
        CaCommand::IssueNode {
            ca,
            node,
            out,
            validity,
        } => {
            let files = identity::issue_node(&ca, &node, &out, validity)?;
            println!("node intermediate for {node}: {}", files.cert.display());
        }
        CaCommand::IssueWorkload {
            node_dir,
            identity,
            out,
            ttl,
        } => {
            let minter = identity::Minter::load(&node_dir, identity.trust_domain().clone())?
                .with_ttl(ttl)?;
            let cert = identity::CertStore::new(minter).get(&identity)?;
            let (chain, key) = cert.to_pem();
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("cert.pem"), chain)?;
            let key_path = out.join("key.pem");
            std::fs::write(&key_path, key)?;
            std::fs::set_permissions(
                &key_path,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
            println!(
                "certificate for {identity}: {}",
                out.join("cert.pem").display()
            );
        }
    }
    Ok(())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run {
            config,
            node_name,
            ebpf_object,
            worker_threads,
        } => run(config, node_name.as_deref(), ebpf_object, worker_threads),
        Command::Uninstall { config } => uninstall(config),
        Command::Ca { command } => ca(command),
        Command::Status(t) => query(t, Request::Status),
        Command::Workloads(t) => query(t, Request::Workloads),
        Command::Conns(t) => query(t, Request::Conns),
        Command::Certs(t) => query(t, Request::Certs),
        Command::Policies(t) => query(t, Request::Policies),
        Command::Explain { from, to, target } => query(target, Request::Explain { from, to }),
        Command::Config {
            command: ConfigCommand::Dump(t),
        } => query(t, Request::ConfigDump),
        Command::Policy {
            command:
                PolicyCommand::Lint {
                    path,
                    root_namespace,
                },
        } => lint(&path, &root_namespace),
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

fn run(
    config: PathBuf,
    node_name: Option<&str>,
    ebpf_object: Option<PathBuf>,
    worker_threads: u16,
) -> anyhow::Result<()> {
    let mut cfg = NodeConfig::load(&config)?;
    if let Some(name) = node_name {
        cfg = cfg.with_node_name(name)?;
    }
    raise_nofile_limit();
    crate::heap::one_arena();
    let object = ebpf_object
        .map(|p| {
            std::fs::read(&p)
                .map_err(|e| anyhow::anyhow!("reading the eBPF object {}: {e}", p.display()))
        })
        .transpose()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(worker_threads))
        .enable_all()
        .build()?;
    rt.block_on(daemon::run(cfg, object))?;
    Ok(())
}

/// The agent holds a descriptor per proxied connection (and per pod listener): the usual soft limit of
/// 1,024 would refuse connections long before memory runs short, so the soft limit goes up to the
/// hard one, which the operator (or the container runtime) sets.
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "could not raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-file limit"),
    }
}

/// Prints every warning and error; errors make the command fail (exit 1).
fn lint(path: &std::path::Path, root_namespace: &str) -> anyhow::Result<()> {
    let report = crate::policy::lint(path, root_namespace);
    for w in &report.warnings {
        println!("warning: {w}");
    }
    for e in &report.errors {
        println!("error: {e}");
    }
    println!(
        "{}: {} policies, {} errors, {} warnings",
        path.display(),
        report.policies,
        report.errors.len(),
        report.warnings.len()
    );
    if report.errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} has errors", path.display())
    }
}

fn socket_path(t: &Target) -> anyhow::Result<PathBuf> {
    if let Some(s) = &t.socket {
        return Ok(s.clone());
    }
    match &t.config {
        Some(c) => Ok(NodeConfig::load(c)?.admin.socket),
        None => Ok(crate::config::AdminConfig::default().socket),
    }
}

fn query(t: Target, request: Request) -> anyhow::Result<()> {
    let path = socket_path(&t)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let data = rt.block_on(admin::socket::request(&path, &request))?;
    if t.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    print!("{}", table::render(&request, &data));
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
