//! State shared by every handler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::ApiError;
use crate::archive::ColdReader;
use crate::cluster::Router;
use crate::storage::Store;
use crate::tail::hub::LiveHub;

/// Limits and timings the handlers apply.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub max_body_bytes: u64,
    pub tail_ping_interval: Duration,
    pub tail_send_timeout: Duration,
}

#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    router: Arc<Router>,
    store: Store,
    /// Reads events the local store has trimmed; `None` with the archive off.
    archive: Option<ColdReader>,
    hub: Arc<LiveHub>,
    settings: ApiSettings,
    metrics: Option<PrometheusHandle>,
    /// Set once every shard has replayed the log it found at start.
    recovered: AtomicBool,
    /// Cancelled when the server starts shutting down; tails close on it.
    shutdown: CancellationToken,
    /// Every open tail socket, so shutdown can wait for their close frames.
    tails: TaskTracker,
}

impl AppState {
    pub fn new(
        router: Arc<Router>,
        store: Store,
        archive: Option<ColdReader>,
        hub: Arc<LiveHub>,
        settings: ApiSettings,
        metrics: Option<PrometheusHandle>,
        shutdown: CancellationToken,
    ) -> AppState {
        AppState {
            inner: Arc::new(Inner {
                router,
                store,
                archive,
                hub,
                settings,
                metrics,
                recovered: AtomicBool::new(false),
                shutdown,
                tails: TaskTracker::new(),
            }),
        }
    }

    pub fn router(&self) -> &Router {
        &self.inner.router
    }

    /// Returns a shared handle to the router, for tasks that outlive a request.
    pub fn router_handle(&self) -> Arc<Router> {
        self.inner.router.clone()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn archive(&self) -> Option<&ColdReader> {
        self.inner.archive.as_ref()
    }

    pub fn hub(&self) -> &Arc<LiveHub> {
        &self.inner.hub
    }

    pub fn settings(&self) -> &ApiSettings {
        &self.inner.settings
    }

    pub fn metrics(&self) -> Option<&PrometheusHandle> {
        self.inner.metrics.as_ref()
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    pub fn tails(&self) -> &TaskTracker {
        &self.inner.tails
    }

    pub fn mark_recovered(&self) {
        self.inner.recovered.store(true, Ordering::Release);
    }

    /// Returns why the node cannot serve sessions right now, or `None` when it can.
    pub fn unavailable_reason(&self) -> Option<String> {
        if self.inner.shutdown.is_cancelled() {
            return Some("the server is shutting down".to_string());
        }
        if !self.inner.recovered.load(Ordering::Acquire) {
            return Some("storage is still being recovered".to_string());
        }
        None
    }

    /// Returns why the node is not ready, or `None` when it is: it must be
    /// available and every shard it hosts must have a leader. A request for
    /// one shard does not wait on the others, so this is stricter than
    /// [`AppState::unavailable_reason`].
    pub fn readiness_problem(&self) -> Option<String> {
        if let Some(reason) = self.unavailable_reason() {
            return Some(reason);
        }
        if !self.inner.router.all_have_leaders() {
            return Some("a shard on this node has no leader".to_string());
        }
        None
    }

    /// Fails with 503 unless the node can serve sessions.
    pub fn ensure_available(&self) -> Result<(), ApiError> {
        match self.unavailable_reason() {
            Some(reason) => Err(ApiError::Unavailable(format!("{reason}; retry shortly"))),
            None => Ok(()),
        }
    }
}
