//! `GET /v1/sessions/:id/tail`: the WebSocket tail.
//!
//! Everything that can be refused (bad id, bad cursor, unknown session,
//! cursor beyond the end) is refused with an HTTP error before the upgrade.
//! After it, the socket carries one text frame per event and is closed
//! with a close frame: 1001 when the server shuts down or the client stops
//! answering pings, 1011 when storage fails or has a hole.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Notify;
use tokio::time::{timeout, Instant};
use tracing::{debug, error, info, warn};

use super::error::ApiError;
use super::session_id;
use super::state::AppState;
use crate::session::request::parse_decimal;
use crate::tail::follower::{FollowError, Follower};

pub(super) const GOING_AWAY: u16 = 1001;
pub(super) const INTERNAL_ERROR: u16 = 1011;

/// Largest inbound message accepted; tails ignore inbound data anyway.
pub(super) const MAX_INBOUND_BYTES: usize = 64 * 1024;

pub async fn upgrade(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    match prepare(&state, path, query).await {
        Ok((session_id, cursor)) => match upgrade {
            Ok(upgrade) => accept(state, upgrade, session_id, cursor),
            Err(rejection) => ApiError::InvalidRequest(format!(
                "tail requires a WebSocket upgrade request: {rejection}"
            ))
            .into_response(),
        },
        Err(err) => err.into_response(),
    }
}

/// Validates the request and returns the session id and cursor.
async fn prepare(
    state: &AppState,
    path: Result<Path<String>, PathRejection>,
    query: Option<String>,
) -> Result<(String, u64), ApiError> {
    let session_id = session_id(path)?;
    let cursor = parse_cursor(query.as_deref().unwrap_or(""))?;
    state.ensure_available()?;

    // The leader's view, so a session created or appended to a moment ago
    // through any node is found even if this replica has not applied it yet.
    let Some(header) = state.router().read_header(&session_id).await? else {
        return Err(ApiError::SessionNotFound(session_id));
    };
    if cursor > header.last_seq {
        return Err(ApiError::InvalidRequest(format!(
            "cursor {cursor} is beyond the session's last_seq {}; reconnect with a cursor from 0 to {}",
            header.last_seq, header.last_seq
        )));
    }
    Ok((session_id, cursor))
}

/// Parses the query string: only `cursor`, at most once, a canonical decimal.
fn parse_cursor(query: &str) -> Result<u64, ApiError> {
    let mut cursor = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name != "cursor" {
            return Err(ApiError::InvalidRequest(format!(
                "unknown query parameter {name:?}; the tail accepts only cursor"
            )));
        }
        if cursor.is_some() {
            return Err(ApiError::InvalidRequest(
                "cursor must be given at most once".to_string(),
            ));
        }
        let parsed = parse_decimal(&value).ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "cursor {value:?} is invalid; it must be a non-negative integer without sign or leading zeros"
            ))
        })?;
        cursor = Some(parsed);
    }
    Ok(cursor.unwrap_or(0))
}

fn accept(state: AppState, upgrade: WebSocketUpgrade, session_id: String, cursor: u64) -> Response {
    if !state.router().hosts_session(&session_id) {
        return super::relay::accept(state, upgrade, session_id, cursor);
    }
    // Subscribing before the upgrade completes is what keeps events appended
    // from now on out of the gap between replay and live.
    let subscription = state.hub().subscribe(&session_id);
    let follower = Follower::new(
        session_id.clone(),
        state.store().clone(),
        state.archive().cloned(),
        subscription,
        cursor,
    );
    let tails = state.tails().clone();

    upgrade
        .max_message_size(MAX_INBOUND_BYTES)
        .on_upgrade(move |socket| {
            tails.track_future(serve(socket, follower, state, session_id, cursor))
        })
}

/// Reason the socket loop ended.
enum Ending {
    Close(u16, String),
    /// The peer is gone or the socket broke; a close frame cannot be sent.
    Dropped(String),
}

async fn serve(
    socket: WebSocket,
    mut follower: Follower,
    state: AppState,
    session_id: String,
    cursor: u64,
) {
    info!(session_id = %session_id, cursor, "tail opened");
    crate::metrics::tail_opened();

    let (mut sink, stream) = socket.split();
    let activity = Arc::new(Activity::new());
    let reader = tokio::spawn(read_inbound(stream, activity.clone()));

    let ending = follow(&mut sink, &mut follower, &state, &activity).await;
    match &ending {
        Ending::Close(code, reason) => {
            let frame = close_frame(*code, reason);
            let sent = timeout(
                state.settings().tail_send_timeout,
                sink.send(Message::Close(Some(frame))),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                debug!(session_id = %session_id, "close frame could not be sent");
            }
        }
        Ending::Dropped(_) => {}
    }
    reader.abort();

    crate::metrics::tail_closed();
    let (code, reason) = match ending {
        Ending::Close(code, reason) => (Some(code), reason),
        Ending::Dropped(reason) => (None, reason),
    };
    info!(session_id = %session_id, last_seq = follower.last_sent(), close_code = ?code, reason = %reason, "tail closed");
}

/// Sends frames until the tail must end, pinging while idle.
async fn follow(
    sink: &mut SplitSink<WebSocket, Message>,
    follower: &mut Follower,
    state: &AppState,
    activity: &Activity,
) -> Ending {
    let settings = state.settings();
    let mut ping = tokio::time::interval_at(
        Instant::now() + settings.tail_ping_interval,
        settings.tail_ping_interval,
    );

    loop {
        tokio::select! {
            _ = state.shutdown_token().cancelled() => {
                return Ending::Close(GOING_AWAY, "server shutting down".to_string());
            }
            _ = activity.closed.notified() => {
                return Ending::Dropped("client closed the connection".to_string());
            }
            _ = ping.tick() => {
                if activity.idle_for() > settings.tail_ping_interval * 2 {
                    return Ending::Close(GOING_AWAY, "no pong received".to_string());
                }
                if let Err(reason) = send(sink, vec![Message::Ping(Default::default())], settings.tail_send_timeout).await {
                    return Ending::Dropped(reason);
                }
            }
            next = follower.next_frames() => match next {
                Ok(frames) => {
                    let messages = frames.into_iter().map(Message::Text).collect();
                    if let Err(reason) = send(sink, messages, settings.tail_send_timeout).await {
                        return Ending::Dropped(reason);
                    }
                }
                Err(FollowError::FeedClosed { .. }) => {
                    return Ending::Close(GOING_AWAY, "server shutting down".to_string());
                }
                Err(err) => {
                    error!(error = %err, "tail cannot continue");
                    return Ending::Close(INTERNAL_ERROR, err.close_reason().to_string());
                }
            }
        }
    }
}

/// Largest close reason in bytes: a close frame's payload is at most 125
/// bytes, two of which hold the code.
const MAX_CLOSE_REASON: usize = 123;

/// Builds a close frame, cutting `reason` at a character boundary to fit.
pub(super) fn close_frame(code: u16, reason: &str) -> CloseFrame {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: reason[..end].into(),
    }
}

/// Writes `messages` and flushes once, giving up when the socket makes no
/// progress for `limit`.
pub(super) async fn send(
    sink: &mut SplitSink<WebSocket, Message>,
    messages: Vec<Message>,
    limit: Duration,
) -> Result<(), String> {
    for message in messages {
        match timeout(limit, sink.feed(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(format!("socket write failed: {err}")),
            Err(_) => {
                warn!(
                    timeout_ms = limit.as_millis() as u64,
                    "tail socket made no progress; dropping it"
                );
                return Err("write timed out".to_string());
            }
        }
    }
    match timeout(limit, sink.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(format!("socket write failed: {err}")),
        Err(_) => {
            warn!(
                timeout_ms = limit.as_millis() as u64,
                "tail socket made no progress; dropping it"
            );
            Err("write timed out".to_string())
        }
    }
}

/// When the client last sent anything, and whether it has gone.
struct Activity {
    last_inbound: std::sync::Mutex<Instant>,
    closed: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            last_inbound: std::sync::Mutex::new(Instant::now()),
            closed: Notify::new(),
        }
    }

    fn touch(&self) {
        *self
            .last_inbound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_inbound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .elapsed()
    }
}

/// Drains inbound frames: data is ignored, any frame counts as a sign of
/// life, and the end of the stream means the client is gone.
async fn read_inbound(mut stream: SplitStream<WebSocket>, activity: Arc<Activity>) {
    while let Some(message) = stream.next().await {
        match message {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => activity.touch(),
        }
    }
    activity.closed.notify_one();
}

#[cfg(test)]
mod tests {
    use super::{close_frame, parse_cursor, MAX_CLOSE_REASON};

    #[test]
    fn close_reasons_fit_a_control_frame() {
        let long = "é".repeat(100);
        let frame = close_frame(1011, &long);
        assert!(frame.reason.len() <= MAX_CLOSE_REASON);
        assert!(
            frame.reason.len() >= MAX_CLOSE_REASON - 1,
            "cut at the last boundary"
        );
        assert_eq!(close_frame(1001, "short").reason.as_str(), "short");
    }

    #[test]
    fn cursor_accepts_canonical_decimals() {
        assert_eq!(parse_cursor("").unwrap(), 0);
        assert_eq!(parse_cursor("cursor=0").unwrap(), 0);
        assert_eq!(parse_cursor("cursor=41").unwrap(), 41);
    }

    #[test]
    fn cursor_rejects_other_forms() {
        for query in [
            "cursor=-1",
            "cursor=abc",
            "cursor=1.5",
            "cursor=1e3",
            "cursor=",
            "cursor=0x2",
            "cursor=%202",
            "cursor=18446744073709551616",
            "cursor=%2B3",
            "cursor=03",
            "cursor=1&cursor=4",
            "curser=5",
        ] {
            assert!(parse_cursor(query).is_err(), "{query} should be rejected");
        }
    }
}
