//! The `gateway` command: run, check a config, or start the self-contained demo.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::config::{Config, LogFormat, LoggingSettings};
use gateway::store::Kind;
use gateway::upgrade::{Inherited, Outcome, Successor};
use gateway::{DrainOutcome, Gateway};
use std::time::Duration;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shadows `std::println!` in this file: when stdout's reader has gone away
/// (`gateway model inspect FILE | head -5`, `| grep -q`), the command ends quietly with
/// status 0 instead of panicking with a backtrace.
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            stdout_failed(e)
        }
    }};
}

/// Turns off Mesa's implicit Vulkan device-select layer unless the environment says otherwise.
/// The layer connects to a Wayland or X display to find the desktop's GPU; on a headless node
/// there is none and it prints `error: XDG_RUNTIME_DIR is invalid or not set` for every
/// Vulkan instance, which reads like a failure of the gateway. The gateway picks its adapter
/// itself (`scoring::acquire_device`), so the layer has nothing to add. Called first in
/// `main`, while the process has one thread.
fn quiet_vulkan_device_select() {
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// Ends the process after a failed write to stdout: quietly when the reader closed the pipe.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1);
}

#[derive(Parser)]
#[command(name = "gateway", version, about = "TLS reverse proxy for storefronts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a configuration file. SIGTERM or SIGINT drains and exits, SIGHUP reloads
    /// the file, SIGUSR2 upgrades (see `gateway upgrade`).
    Run {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Write the pid of the serving process here once it serves; after an upgrade it
        /// names the new process. `gateway upgrade --pid-file` reads it, and the outcome of an
        /// upgrade is written beside it (`<file>.upgrade`).
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// How long, in seconds, the new process an upgrade starts may take to serve (its
        /// plugins and models loaded) before it is killed and this one serves on.
        #[arg(long, default_value_t = 120)]
        upgrade_timeout_s: u64,
    },
    /// Replace a running gateway by a new process of the binary at the path it was started
    /// from (replace the file first to upgrade the binary), with the same arguments, without
    /// refusing or dropping a connection: the new process takes over the listening sockets
    /// and, once it serves, the old one stops accepting and drains. Exit 0 with the new pid,
    /// or 1 with the reason the new process did not take over (the old one serves on).
    Upgrade {
        /// The running gateway's pid file (`gateway run --pid-file`).
        #[arg(long)]
        pid_file: PathBuf,
        /// How long to wait for the outcome, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    /// Validate a configuration file and exit: 0 when valid, 1 with every problem listed.
    Check {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write the files a configuration names but that do not exist yet, to try it out: a
    /// self-signed certificate for each missing certificate and key, a sample embedding model
    /// for each missing model. Existing files are left alone.
    SampleFiles {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Work with plugin components.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Work with scoring model files (safetensors).
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Signing keys for uploads.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print a running node's status: routes, plugin and model versions, last reload.
    Status {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// The audit trail of management actions (`[store] dir`/audit.log).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Watch and steer a node's experiments and their rollouts.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Start a self-contained demo: a built-in storefront behind the gateway on HTTPS.
    Demo {
        /// HTTPS listener address.
        #[arg(long, default_value = "127.0.0.1:8443")]
        https: SocketAddr,
        /// Admin listener address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
}

/// `gateway audit ...`.
#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of an audit log: exit 0 with the number of entries, or 1 naming
    /// the first entry that was edited, removed or moved.
    Verify {
        /// The log (`<store dir>/audit.log`).
        file: PathBuf,
    },
}

/// `gateway rollout ...`.
#[derive(Subcommand)]
enum RolloutCommand {
    /// Print every experiment: variants, weights, figures, and the rollout's state, step,
    /// evidence and decisions (JSON).
    Status {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Hold the rollout at its current step.
    Pause {
        /// The experiment.
        experiment: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Carry on from the current step.
    Resume {
        /// The experiment.
        experiment: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Give the canary all the traffic now.
    Promote {
        /// The experiment.
        experiment: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Give the canary no traffic and stop the rollout.
    Abort {
        /// The experiment.
        experiment: String,
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// `gateway model sample --kind`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum SampleKind {
    /// Item (and user) embeddings scored by dot product or cosine.
    Embedding,
    /// A click-through model: embeddings, dense features, ReLU layers, sigmoid.
    Mlp,
}

/// `gateway model sample --similarity`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum SampleSimilarity {
    /// Dot product.
    Dot,
    /// Dot product of unit vectors.
    Cosine,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new Ed25519 signing key and print its public key for `[store] trusted_keys`.
    Generate {
        /// Where to write the secret seed (created, mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where `publish` puts an artifact, and how.
#[derive(clap::Args)]
struct RegistryTarget {
    /// Where to publish it: `oci://REGISTRY/REPOSITORY:TAG` (a loopback registry is reached
    /// over plain HTTP, any other over HTTPS).
    reference: String,
    /// File with the registry credentials: `username:password`, or a bearer token.
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// Ed25519 key (hex seed, from `gateway keys generate`) to sign it with; nodes whose
    /// `[store] trusted_keys` hold its public key accept it where signatures are required.
    #[arg(long)]
    sign_key: Option<PathBuf>,
}

/// Where a running node's admin API is.
#[derive(clap::Args)]
struct AdminTarget {
    /// The node's admin URL.
    #[arg(long, default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// File with the admin bearer token (default: $GATEWAY_ADMIN_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Ed25519 key (hex seed, from `gateway keys generate`) to sign uploads with.
    #[arg(long)]
    sign_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Check a component as `gateway plugin check` does, then publish it to an OCI registry
    /// (the CNCF Wasm artifact layout) and print its manifest digest, for `[[plugins]] source`.
    Publish {
        /// The component file.
        file: PathBuf,
        #[command(flatten)]
        to: RegistryTarget,
        /// Configuration string handed to `init` by the check.
        #[arg(long, default_value = "")]
        config: String,
    },
    /// Upload a plugin to a running node: validated, stored and activated there, or refused
    /// with the reason and nothing changed.
    Push {
        /// The component file.
        file: PathBuf,
        /// The plugin's name in the node's config.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Check that a .wasm file is a component for the plugin world, list what it imports and
    /// exports and what one instance takes, start one instance (running `init` with
    /// `--config`) under the same limits as `gateway run` gives a plugin with default
    /// settings, call each hook once with a `GET --path` request, and report the memory and
    /// fuel it used.
    Check {
        /// The component file.
        file: PathBuf,
        /// Configuration string handed to `init`.
        #[arg(long, default_value = "")]
        config: String,
        /// Path of the test request.
        #[arg(long, default_value = "/")]
        path: String,
        /// The plugin's `memory_limit_bytes` (default: the gateway's default).
        #[arg(long)]
        memory_limit_bytes: Option<usize>,
        /// The plugin's `fuel_per_call` (default: the gateway's default).
        #[arg(long)]
        fuel_per_call: Option<u64>,
        /// After the test call, call each hook this many times in a row and report the mean
        /// CPU and wall-clock time of one call (instance checkout, limits, metrics and the
        /// plugin's own work) and its fuel: the per-call cost of the plugin on this machine
        /// (bench/plugins.sh).
        #[arg(long, default_value_t = 0)]
        calls: u32,
        /// Write /tmp/perf-<pid>.map, so that `perf record` / `perf report` of this command
        /// name the plugin's own functions (from its name section).
        #[arg(long)]
        perf_map: bool,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Check a model file as `gateway model inspect` does, then publish it to an OCI registry
    /// (artifactType application/vnd.storefront.gateway.model.v1) and print its manifest
    /// digest, for `[[models]] source`.
    Publish {
        /// The .safetensors file.
        file: PathBuf,
        #[command(flatten)]
        to: RegistryTarget,
    },
    /// Upload a model to a running node: validated, loaded, warmed and activated there, or
    /// refused with the reason and nothing changed.
    Push {
        /// The .safetensors file.
        file: PathBuf,
        /// The model's name in the node's config.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Print what a model file holds (kind, name, version, dims, tensors, parameters, size) and
    /// whether it loads: exit 0 when valid, 1 with the problem otherwise.
    Inspect {
        /// The .safetensors file.
        file: PathBuf,
    },
    /// Evaluate a model file on held-out interactions (JSON lines) on the CPU path and print
    /// the figures the offline gate compares: NDCG@k, precision@k and recall@k (embedding
    /// models), AUC and log-loss (MLP models). Exit 0 with the figures, 1 with the problem.
    Eval {
        /// The .safetensors file.
        file: PathBuf,
        /// The held-out file: JSON lines, `{"user": 7, "relevant": [3, 9]}` (embedding) or
        /// `{"user": 7, "item": 3, "dense": [0.1], "label": 1}` (mlp).
        #[arg(long)]
        data: PathBuf,
        /// Cutoff of the ranking metrics, in items.
        #[arg(long, default_value_t = 10)]
        k: usize,
    },
    /// Write a small deterministic sample model (seeded PRNG).
    Sample {
        /// The model's kind.
        #[arg(long, value_enum)]
        kind: SampleKind,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Catalog size.
        #[arg(long, default_value_t = 1000)]
        items: usize,
        /// Users (0: an embedding model without a users table).
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Embedding width (embedding models).
        #[arg(long, default_value_t = 32)]
        dim: usize,
        /// How an embedding model compares a query with an item.
        #[arg(long, value_enum, default_value_t = SampleSimilarity::Dot)]
        similarity: SampleSimilarity,
        /// User embedding width (mlp).
        #[arg(long, default_value_t = 16)]
        user_dim: usize,
        /// Item embedding width (mlp).
        #[arg(long, default_value_t = 16)]
        item_dim: usize,
        /// Dense features per row (mlp).
        #[arg(long, default_value_t = 4)]
        dense: usize,
        /// Hidden layer widths, comma separated (mlp; an output layer of width 1 follows).
        #[arg(long, default_value = "64,32", value_delimiter = ',')]
        hidden: Vec<usize>,
        /// PRNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Model name (metadata).
        #[arg(long)]
        name: Option<String>,
        /// Model version (metadata).
        #[arg(long, default_value = "1")]
        version: String,
        /// Integer weights in -2..=2 (exact scores, many ties; for tests).
        #[arg(long)]
        integer_values: bool,
    },
}

fn main() -> ExitCode {
    quiet_vulkan_device_select();
    // While the process has one thread (it edits the environment), and before anything could
    // open a descriptor with an inherited one's number in mind.
    let inherited = match gateway::upgrade::Inherited::from_env() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: taking over from the old process: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::SampleFiles { config } => sample_files(&config),
        Command::Run {
            config: path,
            pid_file,
            upgrade_timeout_s,
        } => Successor::of_this_process(Duration::from_secs(upgrade_timeout_s))
            .context("finding this process's binary")
            .and_then(|successor| {
                let upgrades = Upgrades {
                    inherited,
                    successor,
                    pid_file,
                };
                let config = Config::load(&path)?;
                run(config, Some(path), None, Some(upgrades))
            }),
        Command::Upgrade {
            pid_file,
            timeout_s,
        } => upgrade(&pid_file, Duration::from_secs(timeout_s)),
        Command::Demo { https, admin } => demo(https, admin),
        Command::Keys {
            command: KeysCommand::Generate { out },
        } => gateway::admin_client::generate_key(&out)
            .map(|public| {
                println!("{public}");
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
        Command::Status { target } => client(&target, |node| async move {
            let status = node.status().await?;
            println!(
                "{}",
                serde_json::to_string(&status).expect("the status serializes")
            );
            Ok(())
        }),
        Command::Plugin {
            command: PluginCommand::Push { file, name, target },
        } => push_file(&target, Kind::Plugin, &name, &file),
        Command::Plugin {
            command: PluginCommand::Publish { file, to, config },
        } => match plugin_check(&file, config, "/", None, None, 0, false) {
            Ok(code) if code == ExitCode::SUCCESS => publish(Kind::Plugin, &file, to),
            checked => checked,
        },
        Command::Model { command } => model_command(command),
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => match gateway::store::audit::verify(&file) {
            Ok(entries) => {
                println!(
                    "{}: {} entries, the chain is intact",
                    file.display(),
                    entries.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Rollout {
            command: RolloutCommand::Status { target },
        } => client(&target, |node| async move {
            let rollouts = node.rollouts().await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&rollouts).expect("rollouts serialize")
            );
            Ok(())
        }),
        Command::Rollout { command } => {
            let (verb, experiment, target) = match command {
                RolloutCommand::Pause { experiment, target } => ("pause", experiment, target),
                RolloutCommand::Resume { experiment, target } => ("resume", experiment, target),
                RolloutCommand::Promote { experiment, target } => ("promote", experiment, target),
                RolloutCommand::Abort { experiment, target } => ("abort", experiment, target),
                RolloutCommand::Status { .. } => unreachable!("handled above"),
            };
            client(&target, |node| async move {
                let done = node.rollout_command(&experiment, verb).await?;
                println!(
                    "{}",
                    serde_json::to_string(&done).expect("answers serialize")
                );
                Ok(())
            })
        }
        Command::Plugin {
            command:
                PluginCommand::Check {
                    file,
                    config,
                    path,
                    memory_limit_bytes,
                    fuel_per_call,
                    calls,
                    perf_map,
                },
        } => plugin_check(
            &file,
            config,
            &path,
            memory_limit_bytes,
            fuel_per_call,
            calls,
            perf_map,
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn sample_files(path: &Path) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw = Config::parse_raw(&text, &path.display().to_string())?;
    let base = path.parent().unwrap_or(Path::new("."));
    let write = |file: &Path, bytes: &[u8]| -> anyhow::Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(file, bytes).with_context(|| format!("writing {}", file.display()))?;
        println!("wrote {}", file.display());
        Ok(())
    };
    for c in &raw.tls.certificates {
        let (cert, key) = (base.join(&c.cert), base.join(&c.key));
        match (cert.exists(), key.exists()) {
            (true, true) => println!("kept  {} and its key", cert.display()),
            (false, false) => {
                let names: Vec<&str> = if c.server_names.is_empty() {
                    vec!["localhost"]
                } else {
                    c.server_names.iter().map(String::as_str).collect()
                };
                let (cert_pem, key_pem) = gateway::tls::self_signed(&names)
                    .context("generating a self-signed certificate")?;
                write(&cert, cert_pem.as_bytes())?;
                write(&key, key_pem.as_bytes())?;
            }
            _ => anyhow::bail!(
                "{} and {} must both exist or both be missing; move the other one away first",
                cert.display(),
                key.display()
            ),
        }
    }
    for m in &raw.models {
        // A model pulled from a registry (`source`) has no local file to write.
        let Some(path) = &m.path else { continue };
        let file = base.join(path);
        if file.exists() {
            println!("kept  {}", file.display());
            continue;
        }
        let mut spec = gateway::scoring::SampleSpec::embedding(1000, 32, 1);
        spec.n_users = 100;
        spec.name = format!("sample-{}", m.name);
        write(&file, &gateway::scoring::sample_model(&spec))?;
        if m.sha256.is_some() {
            eprintln!(
                "note: models {:?} is pinned by sha256; the sample does not match the pin",
                m.name
            );
        }
    }
    let keys = raw.feedback.key_file.iter();
    for k in keys.chain(raw.feedback.old_key_files.iter().flatten()) {
        let file = base.join(k);
        if file.exists() {
            println!("kept  {}", file.display());
            continue;
        }
        // 32 random bytes as hex, as `openssl rand -hex 32` would write them.
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).context("reading random bytes for a feedback key")?;
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        write(&file, format!("{hex}\n").as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let c = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    // Plugins are compiled and started once, so a broken component or a config its init
    // refuses is caught here rather than at deploy time.
    if !c.plugins.is_empty() {
        let rt = runtime(1)?;
        let loaded = rt.block_on(async {
            let registry = prometheus::Registry::new();
            let engine = gateway::plugin::PluginRuntime::new(&c.plugin_runtime, &registry)?;
            // Registry sources are pulled, verified and loaded at start; a check reads no
            // registry.
            let local: Vec<_> = c
                .plugins
                .iter()
                .filter(|p| p.oci.is_none())
                .cloned()
                .collect();
            gateway::plugin::load_all(&engine, &local).await
        });
        if let Err(e) = loaded {
            eprintln!("{}: {e}", path.display());
            return Ok(ExitCode::FAILURE);
        }
    }
    // Models are validated in full on the CPU path (no device needed to check a file).
    for m in c.models.iter().filter(|m| m.oci.is_none()) {
        let cfg = gateway::scoring::ScoringConfig::default();
        if let Err(e) = gateway::scoring::serving::load_served(
            &m.path,
            &cfg,
            &gateway::scoring::ComputeDevice::Cpu,
        ) {
            eprintln!(
                "{}: model {:?}: {}: {e}",
                path.display(),
                m.name,
                m.path.display()
            );
            return Ok(ExitCode::FAILURE);
        }
    }
    println!(
        "{}: ok ({} listener(s), {} upstream(s), {} route(s), {} certificate(s), {} plugin(s), {} model(s), {} experiment(s))",
        path.display(),
        c.listeners.len(),
        c.upstreams.len(),
        c.routes.len(),
        c.certificates.len(),
        c.plugins.len(),
        c.models.len(),
        c.experiments.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn plugin_check(
    file: &PathBuf,
    config: String,
    path: &str,
    memory_limit_bytes: Option<usize>,
    fuel_per_call: Option<u64>,
    calls: u32,
    perf_map: bool,
) -> anyhow::Result<ExitCode> {
    // The plugin's own output (stdout, stderr, log calls) shows as it would in the gateway's log.
    init_logging(&LoggingSettings {
        level: "warn,plugin=info".into(),
        format: LogFormat::Text,
        access_log: false,
    });
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    // The engine `gateway run` builds with default settings: same pool, same limits.
    let settings = gateway::config::PluginRuntimeSettings {
        perf_map,
        ..Default::default()
    };
    let registry = prometheus::Registry::new();
    let engine = gateway::plugin::PluginRuntime::new(&settings, &registry)?;
    let started = std::time::Instant::now();
    let report = engine.inspect(&bytes);
    let compiled_in = started.elapsed();
    println!("{}", file.display());
    println!("  version   {}", gateway::store::content_version(&bytes));
    for i in &report.imports {
        println!("  imports   {i}");
    }
    for e in &report.exports {
        println!("  exports   {e}");
    }
    if let Err(e) = report.verdict {
        eprintln!("  not a plugin: {e}");
        return Ok(ExitCode::FAILURE);
    }
    let name = file
        .file_stem()
        .map_or("plugin".into(), |s| s.to_string_lossy().into_owned());
    let mut spec = gateway::config::PluginSpec::with_defaults(&name, file.clone(), config);
    spec.instances = 1;
    if let Some(m) = memory_limit_bytes {
        spec.memory_limit = m;
    }
    if fuel_per_call.is_some() {
        spec.fuel_per_call = fuel_per_call;
    }
    let rt = runtime(1)?;
    let started = std::time::Instant::now();
    let plugin = match rt.block_on(engine.load_bytes(&spec, bytes)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("  {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let f = plugin.footprint;
    let mib = |b: usize| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
    println!(
        "  world     {} (init ok, version {}; compiled in {} ms, started in {} ms)",
        gateway::plugin::WORLD,
        plugin.version,
        compiled_in.as_millis(),
        started.elapsed().as_millis()
    );
    println!(
        "  instance  {} core instances, {} memories, {} tables, memory starts at {}",
        f.core_instances,
        f.memories,
        f.tables,
        mib(f.initial_memory as usize)
    );
    println!(
        "  init      memory reached {} (memory_limit_bytes {})",
        mib(plugin.memory_after_init()),
        spec.memory_limit
    );
    let trial = rt.block_on(plugin.trial(path));
    let fuel = |f: Option<u64>| f.map_or("-".to_string(), |f| f.to_string());
    let local = trial
        .local_status
        .map_or(String::new(), |s| format!(" (answered {s})"));
    println!(
        "  GET {path}  on-request {}{local}, fuel {}; on-response {}, fuel {}",
        trial.on_request.label(),
        fuel(trial.fuel[0]),
        trial.on_response.map_or("not called", |o| o.label()),
        fuel(trial.fuel[1]),
    );
    println!(
        "  memory    reached {} in init and the test calls; fuel_per_call {}",
        mib(plugin.memory_peak()),
        spec.fuel_per_call
            .map_or("off".to_string(), |f| f.to_string())
    );
    if let Some(failure) = trial.failure {
        eprintln!("  the test call failed: {failure}");
        return Ok(ExitCode::FAILURE);
    }
    if calls > 0 {
        // The CPU time of this thread, which runs every call (a current-thread runtime).
        let cpu = || {
            let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
            std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
        };
        let mut line = format!("  {calls} calls");
        for hook in [
            gateway::plugin::Hook::Request,
            gateway::plugin::Hook::Response,
        ] {
            // A tenth as many calls first, unmeasured: caches and the allocator warmed.
            let warm = rt.block_on(plugin.repeat(hook, path, calls / 10 + 1, cpu));
            let cost = warm.and_then(|_| rt.block_on(plugin.repeat(hook, path, calls, cpu)));
            let cost = match cost {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("  a repeated call failed: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let per_call_us = |d: std::time::Duration| d.as_secs_f64() * 1e6 / f64::from(calls);
            line.push_str(&format!(
                "{} {} {:.2} us CPU, {:.2} us wall, fuel {}",
                if line.ends_with("calls") { " " } else { ";" },
                hook.label().replace('_', "-"),
                per_call_us(cost.cpu),
                per_call_us(cost.wall),
                cost.fuel
                    .map_or("-".to_string(), |f| (f / u64::from(calls)).to_string()),
            ));
        }
        println!("{line} (means per call)");
    }
    Ok(ExitCode::SUCCESS)
}

fn model_command(command: ModelCommand) -> anyhow::Result<ExitCode> {
    use gateway::scoring::{self, ModelKind, SampleSpec, Similarity};
    match command {
        ModelCommand::Push { file, name, target } => push_file(&target, Kind::Model, &name, &file),
        ModelCommand::Publish { file, to } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            // Refuse to publish what every node's loader would refuse.
            if let Err(e) = scoring::Model::from_bytes(
                &bytes,
                &scoring::ScoringConfig::default(),
                &scoring::ComputeDevice::Cpu,
            ) {
                eprintln!("{}: invalid: {e}", file.display());
                return Ok(ExitCode::FAILURE);
            }
            publish(Kind::Model, &file, to)
        }
        ModelCommand::Inspect { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            println!("{}", file.display());
            let summary = match scoring::inspect(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("  invalid: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let meta = |k: &str| summary.metadata.get(k).map_or("-", String::as_str);
            println!("  kind        {}", meta("kind"));
            println!("  name        {}", meta("name"));
            println!("  version     {}", meta("version"));
            for (k, v) in &summary.metadata {
                if !["kind", "name", "version"].contains(&k.as_str()) {
                    println!("  {k:<11} {v}");
                }
            }
            for t in &summary.tensors {
                println!("  tensor      {} {} {:?}", t.name, t.dtype, t.shape);
            }
            println!("  parameters  {}", summary.parameters);
            println!("  size        {} bytes", summary.file_bytes);
            let config = scoring::ScoringConfig::default();
            match scoring::Model::from_bytes(&bytes, &config, &scoring::ComputeDevice::Cpu) {
                Ok(_) => {
                    println!("  valid       yes");
                    let f16 = scoring::ScoringConfig {
                        storage: scoring::TableStorage::F16,
                        ..config
                    };
                    match scoring::Model::from_bytes(&bytes, &f16, &scoring::ComputeDevice::Cpu) {
                        Ok(_) => println!("  f16_storage can be used"),
                        Err(e) => println!("  f16_storage cannot be used: {e}"),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("  invalid: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        ModelCommand::Eval { file, data, k } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let model = scoring::Model::from_bytes(
                &bytes,
                &scoring::ScoringConfig::default(),
                &scoring::ComputeDevice::Cpu,
            )
            .with_context(|| format!("loading {}", file.display()))?;
            let held = scoring::HeldOut::load(&data)?;
            let report = scoring::evaluate(&model, &held, k)?;
            println!("{}: {report}", file.display());
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Sample {
            kind,
            out,
            items,
            users,
            dim,
            similarity,
            user_dim,
            item_dim,
            dense,
            hidden,
            seed,
            name,
            version,
            integer_values,
        } => {
            let kind = match kind {
                SampleKind::Embedding => ModelKind::Embedding,
                SampleKind::Mlp => ModelKind::Mlp,
            };
            let spec = SampleSpec {
                kind,
                name: name.unwrap_or_else(|| format!("sample-{kind}")),
                version,
                seed,
                n_items: items,
                n_users: users,
                dim,
                similarity: match similarity {
                    SampleSimilarity::Dot => Similarity::Dot,
                    SampleSimilarity::Cosine => Similarity::Cosine,
                },
                user_dim,
                item_dim,
                n_dense: dense,
                hidden,
                integer_values,
            };
            let bytes = scoring::sample_model(&spec);
            // Refuse to write what the loader would refuse.
            scoring::Model::from_bytes(
                &bytes,
                &scoring::ScoringConfig::default(),
                &scoring::ComputeDevice::Cpu,
            )
            .context("the sample parameters make an invalid model")?;
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("{}: {kind} model, {} bytes", out.display(), bytes.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs an admin client action on a small runtime.
fn client<F, Fut>(target: &AdminTarget, action: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(gateway::admin_client::Node) -> Fut,
    Fut: std::future::Future<Output = Result<(), gateway::admin_client::ClientError>>,
{
    let node = gateway::admin_client::Node::new(&target.admin, target.token_file.as_deref())?;
    match runtime(1)?.block_on(action(node)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `gateway plugin publish` / `gateway model publish`, once the file checked: pushes it to the
/// registry and prints the manifest digest.
fn publish(kind: Kind, file: &Path, to: RegistryTarget) -> anyhow::Result<ExitCode> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let digest = runtime(1)?.block_on(gateway::oci::publish(
        kind,
        bytes,
        &to.reference,
        to.credentials_file.as_deref(),
        to.sign_key.as_deref(),
    ))?;
    println!("{}@{digest}", to.reference);
    Ok(ExitCode::SUCCESS)
}

/// `gateway plugin push` / `gateway model push`.
fn push_file(
    target: &AdminTarget,
    kind: Kind,
    name: &str,
    file: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let key = target.sign_key.clone();
    let (name, file) = (name.to_string(), file.to_path_buf());
    client(target, |node| async move {
        push(&node, kind, &name, &file, key.as_deref()).await
    })
}

async fn push(
    node: &gateway::admin_client::Node,
    kind: Kind,
    name: &str,
    file: &std::path::Path,
    sign_key: Option<&std::path::Path>,
) -> Result<(), gateway::admin_client::ClientError> {
    let (answer, took) = node.push(kind, name, file, sign_key).await?;
    println!(
        "{}",
        serde_json::to_string(&answer).expect("the answer serializes")
    );
    println!(
        "activated in {} ms (upload, validation, warm-up and swap)",
        took.as_millis()
    );
    Ok(())
}

fn init_logging(settings: &LoggingSettings) {
    // rustls warns once per connection about peers' protocol quirks (an IP address sent as
    // SNI, say): the peer's doing, not the operator's, and a log flood under load. Failed
    // handshakes are counted and logged by the gateway itself. A level that names rustls
    // still decides.
    let level = if settings.level.contains("rustls") {
        settings.level.clone()
    } else {
        format!("{},rustls=error", settings.level)
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// One worker thread runs on a current-thread runtime (no work-stealing overhead); more use the
/// multi-thread scheduler.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 0 {
            b.worker_threads(threads);
        }
        b
    };
    b.enable_all().build().context("starting the async runtime")
}

/// What the demo prints once the gateway listens.
type Banner = Box<dyn FnOnce(&Gateway)>;

/// `gateway run`'s part in upgrades ([`gateway::upgrade`]).
struct Upgrades {
    /// What this process inherited from the one it takes over from (nothing on a fresh
    /// start).
    inherited: Inherited,
    /// What SIGUSR2 starts.
    successor: Successor,
    /// `--pid-file`.
    pid_file: Option<PathBuf>,
}

/// Serves until SIGTERM or SIGINT, then drains. SIGHUP reloads `path`, when given. With
/// `upgrades`, SIGUSR2 starts a new process that takes over, and this one drains.
fn run(
    config: Config,
    path: Option<PathBuf>,
    banner: Option<Banner>,
    upgrades: Option<Upgrades>,
) -> anyhow::Result<ExitCode> {
    init_logging(&config.logging);
    let rt = runtime(config.server.worker_threads)?;
    rt.block_on(async move {
        // Before anything else: until a handler is installed, SIGHUP's and SIGUSR2's default
        // action ends the process, and a reload sent during start-up must not kill it.
        let signals = Signals::install()?;
        let (mut inherited, upgrades) = match upgrades {
            Some(u) => (u.inherited, Some((u.successor, u.pid_file))),
            None => (Inherited::none(), None),
        };
        let gateway =
            Gateway::start_inheriting(config, prometheus::Registry::new(), &mut inherited)
                .await
                .context("starting the gateway")?;
        let mut _watch = None;
        if let Some(path) = &path {
            gateway.set_config_path(path);
            if gateway.config().server.watch_files {
                let debounce = gateway.config().server.watch_debounce;
                _watch = Some(
                    gateway
                        .watch_config(debounce)
                        .context("watching the config files")?,
                );
            }
        }
        let pid_file = upgrades.as_ref().and_then(|(_, p)| p.clone());
        if let Some(p) = pid_file.as_deref().filter(|_| !inherited.is_upgrade()) {
            // After an upgrade the old process rewrites it, once this one has taken over.
            gateway::upgrade::write_pid_file(p, std::process::id())
                .with_context(|| format!("writing the pid file {}", p.display()))?;
        }
        // Everything serves: the old process, if any, may stop accepting now. The inherited
        // sockets no listener took are closed here.
        if let Err(e) = inherited.ready() {
            // The old process is gone (it crashed, or was killed meanwhile): this one has the
            // sockets and serves on, and nobody else will name it in the pid file.
            tracing::warn!(error = %e, "the old process did not hear that this one serves; serving on");
            if let Some(p) = &pid_file {
                gateway::upgrade::write_pid_file(p, std::process::id())
                    .with_context(|| format!("writing the pid file {}", p.display()))?;
            }
        }
        drop(inherited);
        if let Some(banner) = banner {
            banner(&gateway);
        }
        let stopped = signals.wait(&gateway, upgrades.as_ref()).await;
        let outcome = match stopped {
            Stop::Signal => gateway.shutdown().await,
            Stop::HandedOver => {
                // The new process watches the files now.
                drop(_watch);
                gateway.hand_over().await
            }
        };
        match outcome {
            DrainOutcome::Complete => tracing::info!("drained, exiting"),
            DrainOutcome::DeadlineExceeded => tracing::warn!("drain deadline passed, exiting"),
        }
        if let Some(p) = &pid_file {
            gateway::upgrade::remove_pid_file(p, std::process::id());
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Why [`Signals::wait`] returned.
enum Stop {
    /// SIGTERM or SIGINT: drain and exit.
    Signal,
    /// A new process took over: drain and exit.
    HandedOver,
}

/// `gateway upgrade`: signals the process the pid file names and waits for the outcome it
/// writes beside the pid file.
fn upgrade(pid_file: &Path, timeout: Duration) -> anyhow::Result<ExitCode> {
    use gateway::upgrade as up;
    let pid = up::read_pid_file(pid_file)
        .with_context(|| format!("reading the pid file {}", pid_file.display()))?;
    if !up::alive(pid) {
        anyhow::bail!("process {pid} (from {}) is not running", pid_file.display());
    }
    let report = up::outcome_path(pid_file);
    match std::fs::remove_file(&report) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", report.display())),
    }
    up::signal_upgrade(pid).with_context(|| format!("sending SIGUSR2 to process {pid}"))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match Outcome::read(&report) {
            Some(Outcome::HandedOver(new)) => {
                println!("upgraded: process {new} serves; process {pid} drains and exits");
                return Ok(ExitCode::SUCCESS);
            }
            Some(Outcome::Failed(why)) => {
                eprintln!("upgrade failed; process {pid} serves on: {why}");
                return Ok(ExitCode::FAILURE);
            }
            None => {}
        }
        if !up::alive(pid) {
            eprintln!("process {pid} exited during the upgrade without reporting an outcome");
            return Ok(ExitCode::FAILURE);
        }
        if std::time::Instant::now() > deadline {
            eprintln!(
                "no outcome from process {pid} within {} s (see its log)",
                timeout.as_secs()
            );
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The process's signal handlers; signals that arrive before [`Signals::wait`] are kept.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            usr2: signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?,
        })
    }

    /// Returns on SIGTERM or SIGINT, or once a new process started on SIGUSR2 has taken over;
    /// each SIGHUP reloads the config file (a failed reload is logged and counted, and the
    /// running configuration stays). `upgrades`: what SIGUSR2 starts, and the pid file.
    async fn wait(
        mut self,
        gateway: &Gateway,
        upgrades: Option<&(Successor, Option<PathBuf>)>,
    ) -> Stop {
        let mut upgrading = None;
        loop {
            tokio::select! {
                _ = self.term.recv() => { tracing::info!("SIGTERM received"); break; }
                _ = self.int.recv() => { tracing::info!("SIGINT received"); break; }
                _ = self.hup.recv() => {
                    if upgrading.is_some() {
                        tracing::info!("SIGHUP received during an upgrade: ignored (the new process reads the configuration file as it starts)");
                        continue;
                    }
                    tracing::info!("SIGHUP received, reloading");
                    let _ = gateway.reload_from_file().await;
                }
                _ = self.usr2.recv() => match upgrades {
                    None => tracing::warn!("SIGUSR2 received: only `gateway run` upgrades; ignored"),
                    Some(_) if upgrading.is_some() => tracing::warn!("SIGUSR2 received: an upgrade is already under way; ignored"),
                    Some((successor, _)) => {
                        tracing::info!("SIGUSR2 received, upgrading");
                        upgrading = Some(Box::pin(gateway.upgrade(successor)));
                    }
                },
                done = async { upgrading.as_mut().expect("guarded by the condition").await }, if upgrading.is_some() => {
                    upgrading = None;
                    let pid_file = upgrades.and_then(|(_, p)| p.as_deref());
                    let outcome = match done {
                        Ok(pid) => {
                            tracing::info!(new_pid = pid, "upgrade: the new process serves; draining this one");
                            Outcome::HandedOver(pid)
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "upgrade failed; this process serves on");
                            Outcome::Failed(e.to_string())
                        }
                    };
                    report_upgrade(pid_file, &outcome);
                    if matches!(outcome, Outcome::HandedOver(_)) {
                        return Stop::HandedOver;
                    }
                }
            }
        }
        if upgrading.is_some() {
            // Dropping the upgrade kills the new process.
            let pid_file = upgrades.and_then(|(_, p)| p.as_deref());
            report_upgrade(
                pid_file,
                &Outcome::Failed("the old process was told to stop during the upgrade".into()),
            );
        }
        Stop::Signal
    }
}

/// Writes an upgrade's outcome beside the pid file for `gateway upgrade`; after a hand-over,
/// first the new pid into the pid file, so that the outcome is never read before it.
fn report_upgrade(pid_file: Option<&Path>, outcome: &Outcome) {
    let Some(pid_file) = pid_file else { return };
    if let Outcome::HandedOver(pid) = outcome {
        if let Err(e) = gateway::upgrade::write_pid_file(pid_file, *pid) {
            tracing::error!(file = %pid_file.display(), error = %e, "cannot write the new pid to the pid file");
        }
    }
    let path = gateway::upgrade::outcome_path(pid_file);
    if let Err(e) = outcome.write(&path) {
        tracing::error!(file = %path.display(), error = %e, "cannot write the upgrade's outcome");
    }
}

fn demo(https: SocketAddr, admin: SocketAddr) -> anyhow::Result<ExitCode> {
    // The storefront needs a runtime of its own so it keeps serving while the gateway drains,
    // with a worker thread of its own (a current-thread runtime would only run inside
    // block_on).
    let store_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the storefront runtime")?;
    let upstream = store_rt
        .block_on(gateway::demo::start_storefront(([127, 0, 0, 1], 0).into()))
        .context("starting the demo storefront")?;
    let dir = std::env::temp_dir().join(format!("gateway-demo-{}", std::process::id()));
    // The demo's certificate and model are its own: removed when it stops.
    let demo_files = dir.clone();
    let plugins_dir = gateway::demo::default_plugins_dir();
    let config = gateway::demo::demo_config(&dir, https, admin, upstream, Some(&plugins_dir))
        .context("preparing the demo")?;
    let plugin_note = if config.plugins.is_empty() {
        format!(
            "none: {} has no built plugins (run plugins/build.sh)",
            plugins_dir.display()
        )
    } else {
        config
            .plugins
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(" -> ")
    };
    let banner = Box::new(move |g: &Gateway| {
        let https = g
            .listener_addr("https")
            .expect("demo has an https listener");
        let admin = g.admin_addr();
        println!("storefront gateway demo");
        println!("  storefront upstream   http://{upstream}");
        println!(
            "  gateway (HTTPS)       https://localhost:{}/",
            https.port()
        );
        println!("  admin                 http://{admin}/metrics  /healthz  /readyz");
        println!(
            "  certificate           {} (self-signed)",
            dir.join("demo-cert.pem").display()
        );
        println!("  plugin chain          {plugin_note}");
        println!();
        println!("try:");
        println!(
            "  curl -sk https://localhost:{}/api/search?q=boot",
            https.port()
        );
        println!(
            "  curl -sk --http2 https://localhost:{}/api/recommendations?user=42 -i",
            https.port()
        );
        println!(
            "  curl -sk https://localhost:{}/_gateway/models/recs/rank -d '{{\"user\": 42, \"candidates\": [2, 8, 14, 20]}}'",
            https.port()
        );
        println!(
            "  curl -sk -i --cookie shopper=alice https://localhost:{}/api/recommendations?user=42 | grep -i x-gateway",
            https.port()
        );
        println!("  curl -s http://{admin}/metrics | grep -E 'gateway_(requests|experiment_requests)_total'");
        println!("Ctrl-C stops it (in-flight requests are drained first).");
    });
    let code = run(config, None, Some(banner), None);
    drop(store_rt);
    if let Err(e) = std::fs::remove_dir_all(&demo_files) {
        tracing::warn!(dir = %demo_files.display(), error = %e, "could not remove the demo's files");
    }
    code
}
