//! The `gateway` command: run, check a config, or start the self-contained demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gateway::config::{Config, LogFormat, LoggingSettings};
use gateway::{DrainOutcome, Gateway};

#[derive(Parser)]
#[command(name = "gateway", version, about = "TLS reverse proxy for storefronts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a configuration file.
    Run {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and exit: 0 when valid, 1 with every problem listed.
    Check {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => Config::load(&config)
            .map_err(anyhow::Error::from)
            .and_then(|c| run(c, None)),
        Command::Demo { https, admin } => demo(https, admin),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &PathBuf) -> anyhow::Result<ExitCode> {
    match Config::load(path) {
        Ok(c) => {
            println!(
                "{}: ok ({} listener(s), {} upstream(s), {} route(s), {} certificate(s))",
                path.display(),
                c.listeners.len(),
                c.upstreams.len(),
                c.routes.len(),
                c.certificates.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn init_logging(settings: &LoggingSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.level));
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

/// Serves until SIGTERM or SIGINT, then drains.
fn run(config: Config, banner: Option<Box<dyn FnOnce(&Gateway)>>) -> anyhow::Result<ExitCode> {
    init_logging(&config.logging);
    let rt = runtime(config.server.worker_threads)?;
    rt.block_on(async move {
        let gateway = Gateway::start(config, prometheus::Registry::new())
            .await
            .context("starting the gateway")?;
        if let Some(banner) = banner {
            banner(&gateway);
        }
        wait_for_signal().await?;
        match gateway.shutdown().await {
            DrainOutcome::Complete => tracing::info!("drained, exiting"),
            DrainOutcome::DeadlineExceeded => tracing::warn!("drain deadline passed, exiting"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

fn demo(https: SocketAddr, admin: SocketAddr) -> anyhow::Result<ExitCode> {
    // The storefront needs a runtime of its own so it keeps serving while the gateway drains.
    let store_rt = runtime(1)?;
    let upstream = store_rt
        .block_on(gateway::demo::start_storefront(([127, 0, 0, 1], 0).into()))
        .context("starting the demo storefront")?;
    let dir = std::env::temp_dir().join(format!("gateway-demo-{}", std::process::id()));
    let config =
        gateway::demo::demo_config(&dir, https, admin, upstream).context("preparing the demo")?;
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
        println!("  curl -s http://{admin}/metrics | grep gateway_requests_total");
        println!("Ctrl-C stops it (in-flight requests are drained first).");
    });
    let code = run(config, Some(banner));
    drop(store_rt);
    code
}
