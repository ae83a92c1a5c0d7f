//! The `starcite` server binary.

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use starcite::config::Settings;

/// mimalloc instead of the system allocator: request handling allocates many
/// small, short-lived buffers, where glibc malloc showed up prominently in
/// profiles of the append path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let settings = Settings::parse();
    init_tracing();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(error = %err, "starting the async runtime failed");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            error!(error = format!("{err:#}"), "starcite stopped with an error");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("starcite=info,openraft=off,fjall=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    info!(
        host = %settings.host,
        port = settings.port,
        data_dir = %settings.data_dir.display(),
        shards = settings.shards,
        max_body_bytes = settings.max_body_bytes,
        tail_ping_interval_ms = settings.tail_ping_interval_ms,
        tail_send_timeout_ms = settings.tail_send_timeout_ms,
        tail_buffer_events = settings.tail_buffer_events,
        storage_cache_mb = settings.storage_cache_mb,
        "starting starcite"
    );
    let metrics = starcite::metrics::install().context("installing the metrics recorder failed")?;
    starcite::metrics::spawn_upkeep(metrics.clone());

    let addr = SocketAddr::new(settings.host, settings.port);
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("binding {addr} failed; is another process using the port? set PORT to change it")
    })?;
    info!(addr = %listener.local_addr()?, "listening");

    starcite::server::run(settings, listener, Some(metrics), shutdown_signal()).await
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            error!(error = %err, "listening for Ctrl-C failed");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                error!(error = %err, "listening for SIGTERM failed");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        _ = ctrl_c => info!(signal = "SIGINT", "signal received"),
        _ = terminate => info!(signal = "SIGTERM", "signal received"),
    }
}
