//! The HTTP accept loop.
//!
//! `axum::serve` offers no way to configure hyper's connections, and its
//! default closes a connection as soon as the client half-closes it, even
//! with a response still pending. Clients that shut down their sending side
//! after the request body (allowed by HTTP/1.1, and what some tools do after
//! an upload) would then lose the response, 413s on large bodies included.
//! This loop serves each connection with half-close support, WebSocket
//! upgrades and graceful shutdown.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Accepts connections until `shutdown` is cancelled, then waits up to
/// `drain_timeout` for requests in flight to finish.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    shutdown: CancellationToken,
    drain_timeout: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().half_close(true);

    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Usually out of file descriptors; back off instead of spinning.
                    warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%peer, error = %err, "setting TCP_NODELAY failed");
        }

        let service = TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }

    drop(listener);
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            timeout_ms = drain_timeout.as_millis() as u64,
            "connections still open after the drain timeout"
        );
    }
}
