//! HTTP client for node-to-node calls: Raft messages, forwarded writes and
//! forwarded reads.
//!
//! Every call is an HTTP/1.1 `POST` or `GET` to a peer's peer port with a
//! postcard body, over reqwest's pooled keep-alive connections. Each request
//! carries the cluster layout fingerprint, so a node started with a
//! different member list or shard count is rejected instead of mixing logs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{info, warn};

/// Header carrying the layout fingerprint on every peer request.
pub const LAYOUT_HEADER: &str = "x-starcite-layout";
/// Content type of postcard bodies.
pub const CONTENT_TYPE: &str = "application/x-starcite-postcard";

/// Maximum body size in bytes of a peer call, enough for a full batch of Raft
/// entries or a snapshot chunk with room to spare.
pub const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

/// Failure of a peer call, classified by what it means for the request's
/// effect on the peer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The request never reached the peer (no address, encoding failed,
    /// connection refused or failed), so it certainly had no effect there.
    #[error("node {node} is unreachable: {reason}")]
    Unreachable { node: u64, reason: String },
    /// The request may have reached the peer, but no usable response came
    /// back (a timeout, a broken connection, an error status from after the
    /// peer's checks, or an undecodable body). Whether it had an effect is
    /// unknown.
    #[error("no response from node {node}: {reason}")]
    NoAnswer { node: u64, reason: String },
    /// The peer rejected the request before acting on it (a malformed or
    /// misaddressed request, another cluster layout, a body too large).
    #[error("node {node} rejected the request ({status}): {message}")]
    Refused {
        node: u64,
        status: u16,
        message: String,
    },
}

/// Pooled HTTP client and the peer addresses configured on this node.
#[derive(Clone)]
pub struct Peers {
    client: reqwest::Client,
    addresses: Arc<BTreeMap<u64, String>>,
    layout: Arc<str>,
    /// Peers whose last connection attempt failed. Only a change is logged,
    /// because every shard retries a down peer several times a second.
    unreachable: Arc<Mutex<BTreeSet<u64>>>,
}

impl Peers {
    /// Creates the client for `addresses` (node id → `host:port`), sending
    /// `layout` as the fingerprint on every request.
    pub fn new(addresses: BTreeMap<u64, String>, layout: String) -> anyhow::Result<Peers> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            // Limits the idle connections kept per peer. Replication streams
            // and forwarded requests open more while busy.
            .pool_max_idle_per_host(64)
            .http1_only()
            // Peer traffic goes straight to the peer port, whatever proxy
            // the environment (HTTP_PROXY and friends) names for other HTTP.
            .no_proxy()
            .build()?;
        Ok(Peers {
            client,
            addresses: Arc::new(addresses),
            layout: layout.into(),
            unreachable: Arc::default(),
        })
    }

    /// Returns the peer address of `node`.
    pub fn address(&self, node: u64) -> Option<&str> {
        self.addresses.get(&node).map(String::as_str)
    }

    /// Returns the layout fingerprint this node sends and expects.
    pub fn layout(&self) -> &str {
        &self.layout
    }

    /// POSTs `body` to `path` on `node` and decodes the response.
    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        node: u64,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let bytes = postcard::to_allocvec(body).map_err(|err| CallError::Unreachable {
            node,
            reason: format!("encoding the request failed: {err}"),
        })?;
        let url = self.url(node, path)?;
        let request = self
            .client
            .post(url)
            .header(LAYOUT_HEADER, &*self.layout)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .timeout(timeout)
            .body(bytes);
        self.send(node, request).await
    }

    /// GETs `path` on `node` and decodes the response.
    pub async fn get<Resp: DeserializeOwned>(
        &self,
        node: u64,
        path: &str,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let url = self.url(node, path)?;
        let request = self
            .client
            .get(url)
            .header(LAYOUT_HEADER, &*self.layout)
            .timeout(timeout);
        self.send(node, request).await
    }

    /// Logs when `node` becomes unreachable and when it is reachable again.
    fn track_reachability<T>(&self, node: u64, sent: &Result<T, CallError>) {
        let mut unreachable = self
            .unreachable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match sent {
            Err(CallError::Unreachable { reason, .. }) => {
                if unreachable.insert(node) {
                    warn!(node, addr = self.address(node).unwrap_or(""), reason = %reason, "peer unreachable");
                }
            }
            _ => {
                if unreachable.remove(&node) {
                    info!(
                        node,
                        addr = self.address(node).unwrap_or(""),
                        "peer reachable again"
                    );
                }
            }
        }
    }

    fn url(&self, node: u64, path: &str) -> Result<String, CallError> {
        let addr = self.address(node).ok_or_else(|| CallError::Unreachable {
            node,
            reason: "it is not in CLUSTER_NODES".to_string(),
        })?;
        Ok(format!("http://{addr}{path}"))
    }

    async fn send<Resp: DeserializeOwned>(
        &self,
        node: u64,
        request: reqwest::RequestBuilder,
    ) -> Result<Resp, CallError> {
        let sent = request.send().await.map_err(|err| classify(node, &err));
        self.track_reachability(node, &sent);
        let response = sent?;
        let status = response.status();
        let body = response.bytes().await.map_err(|err| CallError::NoAnswer {
            node,
            reason: format!("reading the response failed: {err}"),
        })?;
        if !status.is_success() {
            let message: String = String::from_utf8_lossy(&body).chars().take(500).collect();
            // Only these statuses come from checks the peer port makes before
            // it touches a shard. Any other (a 500 after the work, a proxy's
            // 502 or 504) may follow a request that was carried out.
            // NOTE: no test has a peer or proxy return a 5xx; this branch has
            // only been checked by reading.
            let rejected_before_work = matches!(status.as_u16(), 400 | 404 | 409 | 413);
            if !rejected_before_work {
                return Err(CallError::NoAnswer {
                    node,
                    reason: format!("HTTP {status}: {message}"),
                });
            }
            return Err(CallError::Refused {
                node,
                status: status.as_u16(),
                message,
            });
        }
        postcard::from_bytes(&body).map_err(|err| CallError::NoAnswer {
            node,
            reason: format!("decoding the response failed: {err}"),
        })
    }
}

/// Classifies a reqwest failure as unreachable (the connection was never
/// made) or as no response (outcome unknown).
fn classify(node: u64, err: &reqwest::Error) -> CallError {
    let reason = error_chain(err);
    if err.is_connect() {
        CallError::Unreachable { node, reason }
    } else {
        CallError::NoAnswer { node, reason }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
