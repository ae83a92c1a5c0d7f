//! Routes of the peer port: Raft messages, forwarded writes and reads, and
//! tails relayed for nodes that host no replica of a session.
//!
//! Bodies are postcard, see [`crate::consensus::transport`]. Every request
//! must carry this cluster's layout fingerprint. A request from a node
//! configured for another cluster is rejected with `409` before it reaches a
//! shard.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::warn;

use super::state::AppState;
use super::tail;
use crate::cluster::route::{PeerAnswer, Refusal, ShardRoute};
use crate::consensus::transport::{CONTENT_TYPE, LAYOUT_HEADER, MAX_BODY_BYTES};
use crate::consensus::{Command, Raft, TypeConfig};

/// Builds the peer port's routes.
// TODO: authenticate peers (mutual TLS or a shared secret). Until then the
// peer port must be reachable only by the other nodes.
pub fn router(state: AppState, layout: Arc<str>) -> axum::Router {
    axum::Router::new()
        .route("/_cluster/v1/shards/{shard}/raft/append", post(append))
        .route("/_cluster/v1/shards/{shard}/raft/vote", post(vote))
        .route("/_cluster/v1/shards/{shard}/raft/snapshot", post(snapshot))
        .route("/_cluster/v1/shards/{shard}/write", post(write))
        .route(
            "/_cluster/v1/shards/{shard}/sessions/{id}",
            get(read_header),
        )
        .route("/v1/sessions/{id}/tail", get(tail::upgrade))
        .layer(middleware::from_fn_with_state(layout, check_layout))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Rejects with `409` the requests from nodes configured with another member
/// list, shard count or replication factor.
async fn check_layout(State(layout): State<Arc<str>>, request: Request, next: Next) -> Response {
    let sent = request
        .headers()
        .get(LAYOUT_HEADER)
        .and_then(|value| value.to_str().ok());
    if sent == Some(&*layout) {
        return next.run(request).await;
    }
    warn!(
        sent = ?sent,
        expected = %layout,
        path = %request.uri().path(),
        "peer request from a node with another cluster layout rejected"
    );
    let message = format!(
        "this node belongs to a cluster with layout {layout:?} but the request came with {sent:?}; \
         give every node the same CLUSTER_NODES names, shard count and replication factor"
    );
    (StatusCode::CONFLICT, message).into_response()
}

fn postcard<T: Serialize>(value: &T) -> Response {
    match postcard::to_allocvec(value) {
        Ok(bytes) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], bytes).into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the response failed: {err}"),
        )
            .into_response(),
    }
}

/// Rejection of a peer request before it reached a shard, so nothing was
/// done.
struct Rejected(StatusCode, String);

impl IntoResponse for Rejected {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Rejected> {
    postcard::from_bytes(body).map_err(|err| {
        warn!(error = %err, "decoding a peer request failed");
        Rejected(
            StatusCode::BAD_REQUEST,
            format!("the request body is not a valid message: {err}"),
        )
    })
}

fn route(state: &AppState, shard: u32) -> Result<&ShardRoute, Rejected> {
    state.router().route(shard).ok_or_else(|| {
        Rejected(
            StatusCode::NOT_FOUND,
            format!("shard {shard} does not exist in this cluster"),
        )
    })
}

/// Returns the Raft group of `shard` on this node, or `404` when it hosts
/// none, which means that the sender's member list differs from this node's.
fn raft(state: &AppState, shard: u32) -> Result<Raft, Rejected> {
    route(state, shard)?
        .local()
        .map(|local| local.raft.clone())
        .ok_or_else(|| {
            Rejected(
                StatusCode::NOT_FOUND,
                format!("this node holds no replica of shard {shard}"),
            )
        })
}

async fn append(
    State(state): State<AppState>,
    Path(shard): Path<u32>,
    body: Bytes,
) -> Result<Response, Rejected> {
    let raft = raft(&state, shard)?;
    let request: AppendEntriesRequest<TypeConfig> = decode(&body)?;
    Ok(postcard(&raft.append_entries(request).await))
}

async fn vote(
    State(state): State<AppState>,
    Path(shard): Path<u32>,
    body: Bytes,
) -> Result<Response, Rejected> {
    let raft = raft(&state, shard)?;
    let request: VoteRequest<u64> = decode(&body)?;
    Ok(postcard(&raft.vote(request).await))
}

async fn snapshot(
    State(state): State<AppState>,
    Path(shard): Path<u32>,
    body: Bytes,
) -> Result<Response, Rejected> {
    let raft = raft(&state, shard)?;
    let request: InstallSnapshotRequest<TypeConfig> = decode(&body)?;
    Ok(postcard(&raft.install_snapshot(request).await))
}

/// Handles a write forwarded by a node that is not the shard's leader.
/// During shutdown it returns `Refusal::NotLeader`, so that the sender looks
/// for the leader again.
async fn write(
    State(state): State<AppState>,
    Path(shard): Path<u32>,
    body: Bytes,
) -> Result<Response, Rejected> {
    route(&state, shard)?;
    // The sender encodes an `Arc<Command>`, which serde writes as the command.
    let command: Command = decode(&body)?;
    let answer = if state.shutdown_token().is_cancelled() {
        Err(Refusal::NotLeader { leader: None })
    } else {
        state.router().write_local(shard, command).await
    };
    Ok(postcard(&answer))
}

/// Handles a header read forwarded by a node that is not the shard's leader.
async fn read_header(
    State(state): State<AppState>,
    Path((shard, session_id)): Path<(u32, String)>,
) -> Result<Response, Rejected> {
    let route = route(&state, shard)?;
    let answer: PeerAnswer<_> = route.read_header_here(&session_id).await;
    Ok(postcard(&answer))
}
