//! Tails on a node that hosts no replica of the session's shard.
//!
//! Such a node relays the tail. It opens the same tail on a replica's peer
//! port (the leader first) from the client's cursor and passes the frames on.
//! When that replica goes away it opens the tail again on another one from
//! the last seq it passed on, so the client sees neither a gap nor a
//! duplicate across the switch.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Upstream;
use tracing::{info, warn};

use super::state::AppState;
use super::tail::{send, GOING_AWAY, INTERNAL_ERROR, MAX_INBOUND_BYTES};
use crate::consensus::transport::LAYOUT_HEADER;

/// Maximum time a relay goes without a reachable replica before it closes
/// the client's socket.
const REPLICA_DEADLINE: Duration = Duration::from_secs(10);
/// Pause between two rounds of connection attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Timeout for opening the tail on one replica.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

type UpstreamSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Completes the upgrade and relays the session's tail from a replica.
pub fn accept(
    state: AppState,
    upgrade: WebSocketUpgrade,
    session_id: String,
    cursor: u64,
) -> Response {
    let tails = state.tails().clone();
    upgrade
        .max_message_size(MAX_INBOUND_BYTES)
        .on_upgrade(move |socket| tails.track_future(relay(socket, state, session_id, cursor)))
}

/// End of one upstream connection, with the reason for the logs.
enum Ending {
    /// The relay ends and closes the client's socket with this code and
    /// reason.
    Close(u16, String),
    /// The client is gone, so the relay ends.
    Dropped(String),
    /// The replica went away, so the relay opens the tail on another one.
    Lost(String),
}

async fn relay(socket: WebSocket, state: AppState, session_id: String, cursor: u64) {
    info!(session_id = %session_id, cursor, "relayed tail opened");
    crate::metrics::tail_opened();
    let (mut sink, mut client) = socket.split();
    let mut relay = Relay {
        state: &state,
        session_id: &session_id,
        last_sent: cursor,
        last_inbound: Instant::now(),
        last_upstream: Instant::now(),
    };

    let ending = relay.run(&mut sink, &mut client).await;
    if let Ending::Close(code, reason) = &ending {
        let frame = super::tail::close_frame(*code, reason);
        let limit = state.settings().tail_send_timeout;
        let _ = tokio::time::timeout(limit, sink.send(Message::Close(Some(frame)))).await;
    }

    crate::metrics::tail_closed();
    let reason = match ending {
        Ending::Close(_, reason) | Ending::Dropped(reason) | Ending::Lost(reason) => reason,
    };
    info!(session_id = %session_id, last_seq = relay.last_sent, reason = %reason, "relayed tail closed");
}

struct Relay<'a> {
    state: &'a AppState,
    session_id: &'a str,
    last_sent: u64,
    /// Time the client last sent anything (pongs included).
    last_inbound: Instant,
    /// Time the replica last sent anything. Replicas ping every tail ping
    /// interval, so a long silence means that the connection is dead even if
    /// the OS has not noticed (a partition drops packets without a reset).
    last_upstream: Instant,
}

/// The only field a relay reads from a frame.
#[derive(Deserialize)]
struct Seq {
    seq: u64,
}

impl Relay<'_> {
    async fn run(
        &mut self,
        sink: &mut SplitSink<WebSocket, Message>,
        client: &mut SplitStream<WebSocket>,
    ) -> Ending {
        let mut without_replica_since: Option<Instant> = None;
        loop {
            let Some(upstream) = self.connect().await else {
                let since = *without_replica_since.get_or_insert_with(Instant::now);
                if since.elapsed() > REPLICA_DEADLINE {
                    return Ending::Close(
                        GOING_AWAY,
                        "no replica of this session could serve the tail; reconnect with your last seq as cursor"
                            .to_string(),
                    );
                }
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            };
            without_replica_since = None;

            match self.pump(sink, client, upstream).await {
                Ending::Lost(reason) => {
                    warn!(session_id = %self.session_id, last_seq = self.last_sent, reason = %reason, "replica of a relayed tail lost; reconnecting");
                }
                other => return other,
            }
        }
    }

    /// Opens the tail on the first replica that accepts it.
    async fn connect(&self) -> Option<UpstreamSocket> {
        let router = self.state.router();
        for node in router.replicas_of(self.session_id) {
            let Some(addr) = router.topology().member(node).map(|m| m.addr.clone()) else {
                continue;
            };
            let url = format!(
                "ws://{addr}/v1/sessions/{}/tail?cursor={}",
                self.session_id, self.last_sent
            );
            let mut request = match url.as_str().into_client_request() {
                Ok(request) => request,
                Err(err) => {
                    warn!(url = %url, error = %err, "invalid relay URL");
                    continue;
                }
            };
            if let Ok(value) = router.topology().layout().parse() {
                request.headers_mut().insert(LAYOUT_HEADER, value);
            }
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request))
                .await
            {
                Ok(Ok((socket, _))) => {
                    info!(session_id = %self.session_id, node, cursor = self.last_sent, "relayed tail reading from a replica");
                    return Some(socket);
                }
                Ok(Err(err)) => {
                    warn!(session_id = %self.session_id, node, error = %err, "opening a relayed tail failed")
                }
                Err(_) => {
                    warn!(session_id = %self.session_id, node, "opening a relayed tail timed out")
                }
            }
        }
        None
    }

    /// Passes frames from `upstream` to the client until either side ends.
    async fn pump(
        &mut self,
        sink: &mut SplitSink<WebSocket, Message>,
        client: &mut SplitStream<WebSocket>,
        mut upstream: UpstreamSocket,
    ) -> Ending {
        let settings = self.state.settings();
        self.last_upstream = Instant::now();
        let mut ping = tokio::time::interval_at(
            Instant::now() + settings.tail_ping_interval,
            settings.tail_ping_interval,
        );
        loop {
            tokio::select! {
                _ = self.state.shutdown_token().cancelled() => {
                    return Ending::Close(GOING_AWAY, "server shutting down".to_string());
                }
                inbound = client.next() => match inbound {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        let _ = upstream.close(None).await;
                        return Ending::Dropped("client closed the connection".to_string());
                    }
                    Some(Ok(_)) => self.last_inbound = Instant::now(),
                },
                _ = ping.tick() => {
                    if self.last_inbound.elapsed() > settings.tail_ping_interval * 2 {
                        return Ending::Close(GOING_AWAY, "no pong received".to_string());
                    }
                    // NOTE: no test silences a replica without closing its
                    // socket, so this reconnect has only been checked by reading.
                    if self.last_upstream.elapsed() > settings.tail_ping_interval * 3 {
                        return Ending::Lost("the replica sent nothing for three ping intervals".to_string());
                    }
                    if let Err(reason) = send(sink, vec![Message::Ping(Default::default())], settings.tail_send_timeout).await {
                        return Ending::Dropped(reason);
                    }
                }
                frame = upstream.next() => {
                    if let Some(ending) = self.forward(sink, frame).await {
                        return ending;
                    }
                }
            }
        }
    }

    /// Passes one upstream frame on to the client, skipping events already
    /// sent. Returns the ending when the frame ends this upstream connection
    /// or the relay.
    async fn forward(
        &mut self,
        sink: &mut SplitSink<WebSocket, Message>,
        frame: Option<Result<Upstream, tokio_tungstenite::tungstenite::Error>>,
    ) -> Option<Ending> {
        if matches!(frame, Some(Ok(_))) {
            self.last_upstream = Instant::now();
        }
        let text = match frame {
            Some(Ok(Upstream::Text(text))) => text,
            Some(Ok(Upstream::Close(Some(close)))) if u16::from(close.code) == INTERNAL_ERROR => {
                return Some(Ending::Close(INTERNAL_ERROR, close.reason.to_string()));
            }
            Some(Ok(Upstream::Close(close))) => {
                return Some(Ending::Lost(format!("replica closed the tail: {close:?}")));
            }
            Some(Ok(_)) => return None,
            Some(Err(err)) => {
                return Some(Ending::Lost(format!("replica connection failed: {err}")))
            }
            None => return Some(Ending::Lost("replica connection ended".to_string())),
        };

        let seq = match serde_json::from_str::<Seq>(text.as_str()) {
            Ok(parsed) => parsed.seq,
            Err(err) => {
                return Some(Ending::Close(
                    INTERNAL_ERROR,
                    format!("a replica sent a frame without a seq ({err}); reconnect with your last seq as cursor"),
                ))
            }
        };
        if seq <= self.last_sent {
            return None;
        }
        if seq != self.last_sent + 1 {
            return Some(Ending::Close(
                INTERNAL_ERROR,
                format!(
                    "a replica skipped from seq {} to {seq}; reconnect with your last seq as cursor",
                    self.last_sent
                ),
            ));
        }

        let limit = self.state.settings().tail_send_timeout;
        if let Err(reason) = send(sink, vec![Message::Text(text.as_str().into())], limit).await {
            return Some(Ending::Dropped(reason));
        }
        self.last_sent = seq;
        None
    }
}
