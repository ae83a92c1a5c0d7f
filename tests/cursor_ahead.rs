//! A tail cursor beyond `last_seq` is rejected before the upgrade with the
//! current `last_seq` in the message, instead of waiting and skipping.

mod common;

use std::time::Duration;

use common::*;

async fn assert_cursor_ahead(server: &Server, id: &str, cursor: u64, current: u64) {
    let (status, body) = tail_reject(server, &tail_path(id, &format!("cursor={cursor}"))).await;
    let context = format!("tail {id} cursor={cursor} at last_seq {current}");
    assert_error(status, &body, 400, "invalid_request", &context);
    assert!(
        mentions_number(error_message(&body), current),
        "{context}: message should include the current last_seq {current}: {body}"
    );
}

#[tokio::test]
async fn cursor_ahead_rejected() {
    let mut server = Server::start();
    create_ok(&server, "ses-ahead").await;
    append_ticks(&server, "ses-ahead", 1, 3, 1).await;

    assert_cursor_ahead(&server, "ses-ahead", 10, 3).await;
    assert_cursor_ahead(&server, "ses-ahead", 4, 3).await;

    let mut tail = tail_open(&server, "ses-ahead", 3).await;
    let early = read_for(&mut tail, Duration::from_millis(500)).await;
    assert!(
        early.is_empty(),
        "cursor == last_seq must replay nothing, got {early:?}"
    );
    append_ok(&server, "ses-ahead", tick(4)).await;
    let live = read_until(&mut tail, 4, Duration::from_secs(30)).await;
    assert_gapless(&live, 4, 4, "live append after cursor == last_seq");
    drop(tail);

    create_ok(&server, "ses-ahead-empty").await;
    assert_cursor_ahead(&server, "ses-ahead-empty", 1, 0).await;

    server.sigterm();
    server.restart();

    assert_cursor_ahead(&server, "ses-ahead", 10, 4).await;
    assert_cursor_ahead(&server, "ses-ahead-empty", 1, 0).await;
    let frames = tail_collect(&server, "ses-ahead", 3, 4, Duration::from_secs(30)).await;
    assert_gapless(&frames, 4, 4, "cursor=3 after restart");
}
