//! Start-up and shutdown of a whole node.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, ApiSettings, AppState};
use crate::archive;
use crate::cluster::{Router, RouterSettings, Topology};
use crate::config::Settings;
use crate::consensus::log_store;
use crate::consensus::transport::Peers;
use crate::consensus::EventSink;
use crate::storage::flusher::Flusher;
use crate::storage::watermark;
use crate::storage::{Store, StoreSettings};
use crate::tail::hub::LiveHub;

/// Serves the API on `listener` until `shutdown` completes, then drains:
/// stops accepting, lets in-flight requests finish, closes tails with a
/// close frame, stops the Raft groups and makes the store durable.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let topology = Arc::new(settings.topology().map_err(anyhow::Error::msg)?);
    let archive_settings = settings.archive().map_err(anyhow::Error::msg)?;
    let store = open_store(&settings).await?;
    store.check_layout(&settings.data_dir, &topology.layout())?;
    check_durable_watermark(&settings, &store)?;
    let flusher = Flusher::start(store.clone(), settings.data_dir.clone())
        .context("starting the group commit thread failed")?;
    let hub = LiveHub::new(settings.tail_buffer_events as usize);
    let pending = archive::Pending::default();
    let (sink, hot): (Arc<dyn EventSink>, _) = match &archive_settings {
        Some(_) => {
            let hot = queue_stored_sessions(&store, &pending).await?;
            let sink = archive::ArchiveSink {
                inner: hub.clone(),
                pending: pending.clone(),
                hot: hot.clone(),
            };
            (Arc::new(sink), Some(hot))
        }
        None => (hub.clone(), None),
    };
    let archive_pool = archive_settings.as_ref().map(archive::pool).transpose()?;

    let local_addr = listener.local_addr()?;
    if !topology.is_single() {
        let members: Vec<String> = topology
            .members()
            .map(|m| format!("{}={}@{}", m.id, m.name, m.addr))
            .collect();
        info!(node = topology.local_id(), members = %members.join(","), "cluster members (id=name@peer address)");
    }
    let (peers, peer_listener) = if topology.is_single() {
        (None, None)
    } else {
        let addresses = topology.members().map(|m| (m.id, m.addr.clone())).collect();
        let peers = Peers::new(addresses, topology.layout())?;
        (
            Some(peers),
            Some(bind_peer_port(&settings, &topology).await?),
        )
    };
    let router_settings = RouterSettings {
        snapshot_every: settings.snapshot_every,
    };
    let router = Arc::new(
        Router::start(
            &router_settings,
            topology.clone(),
            peers,
            store.clone(),
            flusher.clone(),
            sink,
        )
        .await?,
    );

    let token = CancellationToken::new();
    let api_settings = ApiSettings {
        max_body_bytes: settings.max_body_bytes,
        tail_ping_interval: settings.tail_ping_interval(),
        tail_send_timeout: settings.tail_send_timeout(),
    };
    let state = AppState::new(
        router,
        store.clone(),
        archive_pool.clone().map(archive::ColdReader::new),
        hub,
        api_settings,
        metrics,
        token.clone(),
    );

    tokio::spawn(mark_ready_after_recovery(state.clone()));
    tokio::spawn(sample_raft_health(state.clone(), token.clone()));
    tokio::spawn(cancel_on(shutdown, token.clone()));

    let archiver = match (archive_settings, archive_pool, hot) {
        (Some(archive_settings), Some(pool), Some(hot)) => {
            let parts = archive::ArchiverParts {
                settings: archive_settings,
                store: store.clone(),
                pending,
                router: state.router_handle(),
                pool,
                hot,
            };
            Some(archive::Archiver::start(parts, token.clone()))
        }
        _ => None,
    };

    // The peer port outlives the public one: while this node drains, its
    // shards still exchange Raft messages to commit in-flight appends.
    let peer_token = CancellationToken::new();
    let peer_server = peer_listener.map(|listener| {
        let routes = api::peer_router(state.clone(), topology.layout().into());
        tokio::spawn(serve_peers(listener, routes, peer_token.clone()))
    });

    info!(addr = %local_addr, "serving");
    api::serve(
        listener,
        api::router(state.clone()),
        token.clone(),
        settings.shutdown_timeout(),
    )
    .await;
    info!("stopped accepting requests; in-flight requests finished");

    drain(&state, &settings).await;
    if let Some(archiver) = archiver {
        if tokio::time::timeout(settings.shutdown_timeout(), archiver)
            .await
            .is_err()
        {
            warn!("the archiver did not stop in time");
        }
    }
    peer_token.cancel();
    if let Some(server) = peer_server {
        if tokio::time::timeout(settings.shutdown_timeout(), server)
            .await
            .is_err()
        {
            warn!("peer port did not close in time");
        }
    }
    flusher.stop();
    store.persist().context("final fsync failed")?;
    info!("shutdown complete");
    Ok(())
}

/// Queues every stored session for the archiver, so that events applied
/// before this start and not archived yet are archived too, and counts the
/// events of the local store. Runs before the Raft groups start, so no
/// apply changes the store meanwhile.
async fn queue_stored_sessions(
    store: &Store,
    pending: &archive::Pending,
) -> anyhow::Result<archive::HotEvents> {
    let started = std::time::Instant::now();
    let scan_store = store.clone();
    let stored = tokio::task::spawn_blocking(move || archive::scan(&scan_store))
        .await
        .context("scanning the stored sessions for the archive failed")?;
    for (session_id, last_seq) in &stored.sessions {
        pending.mark(session_id, *last_seq);
    }
    info!(
        sessions = stored.sessions.len(),
        hot_events = stored.hot.total(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "stored sessions queued for archiving"
    );
    Ok(stored.hot)
}

/// Binds this node's peer port: the port of its own CLUSTER_NODES entry, on
/// the configured host.
async fn bind_peer_port(settings: &Settings, topology: &Topology) -> anyhow::Result<TcpListener> {
    let own = &topology.local().addr;
    let port: u16 = own
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .with_context(|| format!("CLUSTER_NODES address {own:?} has no port"))?;
    warn_if_unreachable_by_peers(settings, own);
    let addr = SocketAddr::new(settings.host, port);
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding the peer port {addr} failed; is another process using it? \
             the port comes from this node's entry ({own}) in CLUSTER_NODES"
        )
    })?;
    info!(peer_addr = %addr, node = %topology.local().name, "peer port bound");
    Ok(listener)
}

/// Warns when this node's peer port binds an address other than the one
/// its peers use for it, for example the default 127.0.0.1 on a cluster
/// spread over hosts.
fn warn_if_unreachable_by_peers(settings: &Settings, own: &str) {
    let Some((host, _)) = own.rsplit_once(':') else {
        return;
    };
    let Ok(advertised) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() else {
        return;
    };
    if !settings.host.is_unspecified() && advertised != settings.host {
        warn!(
            bind = %settings.host,
            advertised = %own,
            "the peer port binds another address than CLUSTER_NODES gives for this node; \
             peers cannot reach it unless STARCITE_HOST is that address or 0.0.0.0"
        );
    }
}

async fn serve_peers(listener: TcpListener, routes: axum::Router, shutdown: CancellationToken) {
    let served = axum::serve(listener, routes)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    match served {
        Ok(()) => info!("peer port closed"),
        Err(err) => error!(error = %err, "peer port failed"),
    }
}

async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let path = settings.data_dir.clone();
    let shards = settings.shards;
    let tuning = StoreSettings {
        cache_bytes: settings.storage_cache_mb * 1024 * 1024,
        write_buffer_bytes: settings.storage_write_buffer_mb * 1024 * 1024,
    };
    let opened = tokio::task::spawn_blocking(move || Store::open(&path, shards, &tuning))
        .await
        .context(
            "the storage engine panicked while recovering; the storage files are likely corrupt",
        )?;
    match opened {
        Ok(store) => Ok(store),
        Err(err) if Store::is_corruption(&err) => Err(anyhow::anyhow!(
            "opening the data directory {} failed, and the storage files are likely corrupt: {err}",
            settings.data_dir.display()
        )),
        Err(err) => Err(err.into()),
    }
}

/// Refuses to start when a shard's recovered log ends before the point that
/// was recorded as durable: the journal lost acknowledged entries.
fn check_durable_watermark(settings: &Settings, store: &Store) -> anyhow::Result<()> {
    let Some(recorded) = watermark::read(&settings.data_dir).map_err(anyhow::Error::msg)? else {
        return Ok(());
    };

    let mut recovered = BTreeMap::new();
    for shard in 0..settings.shards {
        let last = log_store::recovered_last_index(store, shard)?;
        recovered.insert(shard, last.unwrap_or(0));
    }

    let lost = watermark::find_lost_entries(&recorded, &recovered);
    if lost.is_empty() {
        return Ok(());
    }
    for problem in &lost {
        error!(problem = %problem, "storage corruption: acknowledged log entries are missing");
    }
    anyhow::bail!(
        "storage corruption in {}: {}; the journal lost acknowledged entries, so the server will not \
         start on it. Restore the data directory from a backup or a replica",
        settings.data_dir.display(),
        lost.join("; ")
    )
}

async fn mark_ready_after_recovery(state: AppState) {
    match state.router().wait_recovered().await {
        Ok(()) => {
            state.mark_recovered();
            info!("storage recovered; ready once every shard on this node has a leader");
        }
        Err(err) => error!(error = %err, "recovery failed; the node stays unready"),
    }
}

/// Updates the Raft health gauges every second until shutdown.
async fn sample_raft_health(state: AppState, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => crate::metrics::record_raft_health(&state.router().health()),
        }
    }
}

async fn cancel_on(shutdown: impl Future<Output = ()>, token: CancellationToken) {
    shutdown.await;
    info!("shutdown requested");
    token.cancel();
}

/// Waits for tail sockets to send their close frames, then stops the shards.
async fn drain(state: &AppState, settings: &Settings) {
    state.tails().close();
    let open = state.tails().len();
    if open > 0 {
        info!(open, "closing tails");
    }
    if tokio::time::timeout(settings.shutdown_timeout(), state.tails().wait())
        .await
        .is_err()
    {
        warn!(
            still_open = state.tails().len(),
            "tails did not close in time; dropping them"
        );
    }
    state.router().shutdown().await;
}
