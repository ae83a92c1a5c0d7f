//! The Postgres archive against a real Postgres, which `scripts/test.sh`
//! starts on loopback. Each test gets its own database.

mod common;

use std::time::{Duration, Instant};

use common::{append_ok, create_ok, tail_collect, Server};
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

/// Tests that stop Postgres must not overlap with the others.
static POSTGRES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn admin_url() -> String {
    std::env::var("STARCITE_TEST_POSTGRES_URL").expect(
        "STARCITE_TEST_POSTGRES_URL is not set; run the suite with scripts/test.sh, which starts Postgres",
    )
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|err| panic!("connecting to {url} failed: {err}"));
    tokio::spawn(connection);
    client
}

/// Creates an empty database and returns its URL.
async fn fresh_database(label: &str) -> String {
    let admin = admin_url();
    let name = format!("starcite_{label}_{}", std::process::id());
    let client = connect(&admin).await;
    for statement in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        client
            .batch_execute(&statement)
            .await
            .unwrap_or_else(|err| panic!("{statement} failed: {err}"));
    }
    let base = admin.rsplit_once('/').expect("URL has a database").0;
    format!("{base}/{name}")
}

fn archive_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("STARCITE_ARCHIVER_ENABLED", "true".to_string()),
        ("DATABASE_URL", url.to_string()),
        ("STARCITE_ARCHIVE_FLUSH_INTERVAL_MS", "100".to_string()),
    ]
}

fn start(dir: &std::path::Path, env: &[(&'static str, String)]) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start_with(dir, &env)
}

/// Waits until the archive contains `count` events of `session`.
async fn wait_for_rows(client: &Client, session: &str, count: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM events WHERE session_id = $1",
                &[&session],
            )
            .await;
        if let Ok(row) = row {
            let found: i64 = row.get(0);
            if found == count {
                return;
            }
            assert!(
                found < count,
                "{found} rows archived for {session}, expected {count}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "{session}: fewer than {count} rows within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn event(n: u64) -> Value {
    let mut event = json!({
        "type": if n.is_multiple_of(2) { "even" } else { "odd" },
        "payload": {"n": n, "text": format!("event {n}"), "nested": {"list": [n, null, true]}},
        "actor": "agent:archiver",
    });
    if n.is_multiple_of(3) {
        event["source"] = json!("agent");
        event["metadata"] = json!({"role": "worker", "n": n});
        event["refs"] = json!({"to_seq": n - 1, "request_id": format!("req_{n}")});
        event["idempotency_key"] = json!(format!("key-{n}"));
    }
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_rows_equal_what_tails_deliver() {
    let _serial = POSTGRES.lock().await;
    let url = fresh_database("rows").await;
    let dir = tempfile::tempdir().unwrap();
    let server = tokio::task::block_in_place(|| start(dir.path(), &archive_env(&url)));
    let session = "ses-archive-rows";
    create_ok(&server, session).await;
    for n in 1..=150 {
        append_ok(&server, session, event(n)).await;
    }

    let client = connect(&url).await;
    wait_for_rows(&client, session, 150, Duration::from_secs(30)).await;
    let frames = tail_collect(&server, session, 0, 150, Duration::from_secs(30)).await;
    for frame in &frames {
        let seq = frame["seq"].as_i64().unwrap();
        let row = client
            .query_one(
                "SELECT type, payload, actor, source, metadata, refs, idempotency_key,
                        inserted_at = $3::text::timestamptz
                 FROM events WHERE session_id = $1 AND seq = $2",
                &[&session, &seq, &frame["inserted_at"].as_str().unwrap()],
            )
            .await
            .unwrap_or_else(|err| panic!("row {seq} missing: {err}"));
        let columns = json!({
            "type": row.get::<_, String>(0),
            "payload": row.get::<_, Value>(1),
            "actor": row.get::<_, String>(2),
            "source": row.get::<_, Option<String>>(3),
            "metadata": row.get::<_, Value>(4),
            "refs": row.get::<_, Value>(5),
            "idempotency_key": row.get::<_, Option<String>>(6),
        });
        let expected = json!({
            "type": frame["type"], "payload": frame["payload"], "actor": frame["actor"],
            "source": frame["source"], "metadata": frame["metadata"], "refs": frame["refs"],
            "idempotency_key": frame["idempotency_key"],
        });
        assert_eq!(columns, expected, "row {seq} differs from the tail frame");
        assert!(
            row.get::<_, bool>(7),
            "row {seq} has another inserted_at than {}",
            frame["inserted_at"]
        );
    }

    let header = client
        .query_one(
            "SELECT archived_seq, title FROM sessions WHERE id = $1",
            &[&session],
        )
        .await
        .expect("session row missing");
    assert_eq!(header.get::<_, i64>(0), 150, "archived_seq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_mid_run_loses_nothing() {
    let _serial = POSTGRES.lock().await;
    let url = fresh_database("outage").await;
    let dir = tempfile::tempdir().unwrap();
    let server = tokio::task::block_in_place(|| start(dir.path(), &archive_env(&url)));
    let session = "ses-archive-outage";
    create_ok(&server, session).await;
    for n in 1..=50 {
        append_ok(&server, session, event(n)).await;
    }
    let client = connect(&url).await;
    wait_for_rows(&client, session, 50, Duration::from_secs(30)).await;
    drop(client);

    run(&std::env::var("STARCITE_TEST_PG_STOP").expect("STARCITE_TEST_PG_STOP"));
    // Appends go on while Postgres is down, without waiting for it.
    let started = Instant::now();
    for n in 51..=100 {
        append_ok(&server, session, event(n)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "appends waited for Postgres: 50 took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = common::metrics_text(&server).await;
    assert_eq!(
        common::metric_sum(&metrics, "starcite_archive_pending_rows"),
        Some(50.0),
        "the 50 events appended during the outage are reported pending"
    );
    assert_eq!(
        common::metric_sum(&metrics, "starcite_archive_lag"),
        Some(50.0)
    );
    run(&std::env::var("STARCITE_TEST_PG_START").expect("STARCITE_TEST_PG_START"));

    let client = connect(&url).await;
    wait_for_rows(&client, session, 100, Duration::from_secs(60)).await;
    wait_for_metric(
        &server,
        "starcite_archive_pending_rows",
        0.0,
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_archive_on_archives_everything_once() {
    let _serial = POSTGRES.lock().await;
    let url = fresh_database("restart").await;
    let dir = tempfile::tempdir().unwrap();
    let env = archive_env(&url);
    let mut server = tokio::task::block_in_place(|| start(dir.path(), &env));
    let session = "ses-archive-restart";
    create_ok(&server, session).await;
    for n in 1..=40 {
        append_ok(&server, session, event(n)).await;
    }
    // A kill before the flush leaves events to archive after the restart.
    server.kill9();
    tokio::task::block_in_place(|| server.restart());
    for n in 41..=80 {
        append_ok(&server, session, event(n)).await;
    }
    let client = connect(&url).await;
    wait_for_rows(&client, session, 80, Duration::from_secs(30)).await;

    // Archived in full under the default keep count of 1000, so nothing
    // was trimmed. A restart with a smaller one trims the idle session.
    assert_eq!(server.sigterm().code(), Some(0));
    drop(server);
    let server = tokio::task::block_in_place(|| start(dir.path(), &trim_env(&url, 10)));
    wait_for_metric(
        &server,
        "starcite_archive_trimmed_total",
        70.0,
        Duration::from_secs(30),
    )
    .await;
    let frames = tail_collect(&server, session, 0, 80, Duration::from_secs(30)).await;
    common::assert_gapless(&frames, 1, 80, "tail from 0 after trimming an idle session");
}

fn run(script: &str) {
    let status = std::process::Command::new(script)
        .status()
        .unwrap_or_else(|err| panic!("running {script} failed: {err}"));
    assert!(status.success(), "{script} failed: {status}");
}

/// The leader of a session's shard dies while the cluster archives: the new
/// leader takes over, and the archive ends with every event exactly once.
/// Every replica, the restarted one too, trims the same events and serves
/// the whole history from cursor 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_change_while_archiving_leaves_no_gap() {
    let _serial = POSTGRES.lock().await;
    let url = fresh_database("cluster").await;
    let env = trim_env(&url, 10);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut cluster = tokio::task::block_in_place(|| common::cluster::Cluster::start(3, &env));
    let session = "ses-archive-cluster";
    create_ok(cluster.node(1), session).await;

    let leader = cluster.leader_of(session, 8, Duration::from_secs(10)).await;
    let survivor = (1..=3u64).find(|node| *node != leader).expect("a survivor");
    let addr = cluster.node(survivor).addr.to_string();
    let client = reqwest::Client::new();
    let append = |n: u64| {
        let client = client.clone();
        let addr = addr.clone();
        async move {
            let mut body = event(n);
            body["idempotency_key"] = json!(format!("cluster-{n}"));
            let (status, response) = common::cluster::append_retrying(
                &client,
                &addr,
                session,
                &body,
                Duration::from_secs(30),
            )
            .await;
            assert_eq!(status, 201, "append {n}: {response}");
        }
    };
    for n in 1..=100 {
        append(n).await;
    }
    cluster.node_mut(leader).kill9();
    for n in 101..=200 {
        append(n).await;
    }

    let db = connect(&url).await;
    wait_for_rows(&db, session, 200, Duration::from_secs(60)).await;
    let row = db
        .query_one(
            "SELECT count(DISTINCT seq), min(seq), max(seq) FROM events WHERE session_id = $1",
            &[&session],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        (200, 1, 200),
        "the archive must hold seqs 1 to 200 once each"
    );

    tokio::task::block_in_place(|| cluster.node_mut(leader).restart());
    for node in 1..=3u64 {
        // Trims reach a replica through the shard's log, so every one of
        // them ends at the same frontier: all but the newest 10 of 200.
        let server = cluster.node(node);
        wait_for_metric(
            server,
            "starcite_archive_tail_size",
            10.0,
            Duration::from_secs(60),
        )
        .await;
        let frames = tail_collect(server, session, 0, 200, Duration::from_secs(30)).await;
        common::assert_gapless(&frames, 1, 200, &format!("tail from 0 on node {node}"));
    }
}

/// Builds the event at `n`, with U+0000 in every 25th. Postgres cannot
/// store it in `jsonb` or `text`, so those are archived with their frame.
fn event_with_nul(n: u64) -> Value {
    let mut body = event(n);
    if n.is_multiple_of(25) {
        body["payload"]["text"] = json!(format!("nul \u{0} inside {n}"));
        body["metadata"] = json!({"key\u{0}": "value\u{0}"});
    }
    body
}

fn trim_env(url: &str, tail_keep: u64) -> Vec<(&'static str, String)> {
    let mut env = archive_env(url);
    env.push(("STARCITE_TAIL_KEEP", tail_keep.to_string()));
    env
}

/// Waits until the node's metric `name` reaches `value`.
async fn wait_for_metric(server: &Server, name: &str, value: f64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let metrics = common::metrics_text(server).await;
        let found = common::metric_sum(&metrics, name);
        if found == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {found:?}, expected {value} within {timeout:?}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// History written before the archive was on is archived after a restart
/// with it, and the local store keeps only the newest `STARCITE_TAIL_KEEP`
/// events. Tails from any cursor get every event once and in order, and
/// the archived ones equal what the local store served before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_history_is_tailed_across_the_seam() {
    let _serial = POSTGRES.lock().await;
    let url = fresh_database("trim").await;
    let dir = tempfile::tempdir().unwrap();
    let session = "ses-archive-trim";

    // Written and read with the archive off: the reference frames.
    let mut server = tokio::task::block_in_place(|| Server::start_with(dir.path(), &[]));
    create_ok(&server, session).await;
    for n in 1..=200 {
        append_ok(&server, session, event_with_nul(n)).await;
    }
    let reference = tail_collect(&server, session, 0, 200, Duration::from_secs(30)).await;
    assert_eq!(server.sigterm().code(), Some(0));
    drop(server);

    let mut server = tokio::task::block_in_place(|| start(dir.path(), &trim_env(&url, 20)));
    wait_for_metric(
        &server,
        "starcite_archive_trimmed_total",
        180.0,
        Duration::from_secs(60),
    )
    .await;
    wait_for_metric(
        &server,
        "starcite_archive_tail_size",
        20.0,
        Duration::from_secs(10),
    )
    .await;
    let client = connect(&url).await;
    let with_frame: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE session_id = $1 AND frame IS NOT NULL",
            &[&session],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        with_frame, 8,
        "only the events with U+0000 keep their frame"
    );

    // From the start, into the seam from just before it, and from the
    // frontier itself (seq 181 is the first one still local).
    for cursor in [0, 1, 150, 179, 180, 181] {
        let frames = tail_collect(&server, session, cursor, 200, Duration::from_secs(30)).await;
        let context = format!("tail from cursor {cursor}");
        common::assert_gapless(&frames, cursor + 1, 200, &context);
        assert_eq!(
            frames[..],
            reference[cursor as usize..],
            "{context}: frames differ from those served before the trim"
        );
    }

    // Live events follow the archived replay on the same socket.
    let mut tail = common::tail_open(&server, session, 0).await;
    let replayed = common::read_until(&mut tail, 200, Duration::from_secs(30)).await;
    common::assert_gapless(&replayed, 1, 200, "replay before live");
    for n in 201..=230 {
        append_ok(&server, session, event_with_nul(n)).await;
    }
    let live = common::read_until(&mut tail, 230, Duration::from_secs(30)).await;
    common::assert_gapless(&live, 201, 230, "live after the archived replay");
    drop(tail);

    // With Postgres stopped, the trimmed events cannot be served, so the
    // tail closes instead of skipping them. The local ones are still served.
    wait_for_metric(
        &server,
        "starcite_archive_trimmed_total",
        210.0,
        Duration::from_secs(30),
    )
    .await;
    drop(client);
    run(&std::env::var("STARCITE_TEST_PG_STOP").expect("STARCITE_TEST_PG_STOP"));
    let mut tail = common::tail_open(&server, session, 0).await;
    match common::next_item(&mut tail, Duration::from_secs(30)).await {
        common::TailItem::Closed { code, reason } => {
            assert_eq!(code, Some(1011), "close code; reason: {reason}");
            assert!(reason.contains("archive"), "reason: {reason}");
        }
        other => panic!("a tail below the frontier must close while Postgres is down: {other:?}"),
    }
    let local = tail_collect(&server, session, 210, 230, Duration::from_secs(30)).await;
    common::assert_gapless(&local, 211, 230, "local tail while Postgres is down");
    // The bundled client reports that close as a failure.
    let url = server.ws(&common::tail_path(session, "cursor=0"));
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_starcite-tail"))
            .arg(&url)
            .output()
            .expect("running starcite-tail")
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "starcite-tail exit; stderr: {stderr}"
    );
    assert!(stderr.contains("1011"), "stderr: {stderr}");
    run(&std::env::var("STARCITE_TEST_PG_START").expect("STARCITE_TEST_PG_START"));

    // A crash after trimming keeps the seam: the marks are in the store.
    server.kill9();
    tokio::task::block_in_place(|| server.restart());
    let frames = tail_collect(&server, session, 0, 230, Duration::from_secs(60)).await;
    common::assert_gapless(&frames, 1, 230, "tail from 0 after a restart");
    assert_eq!(
        frames[..200],
        reference[..],
        "archived frames after a restart"
    );
    wait_for_metric(
        &server,
        "starcite_archive_tail_size",
        20.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(append_ok(&server, session, event(231)).await, 231);
}

/// Archive settings that cannot work stop the start with a message naming
/// the setting.
#[test]
fn unusable_archive_settings_are_rejected() {
    let cases: [(&[(&str, &str)], &str); 2] = [
        (&[("STARCITE_ARCHIVER_ENABLED", "true")], "DATABASE_URL"),
        (
            &[
                ("STARCITE_ARCHIVER_ENABLED", "true"),
                ("DATABASE_URL", "postgres://127.0.0.1:1/none"),
                ("STARCITE_TAIL_KEEP", "0"),
            ],
            "tail-keep",
        ),
    ];
    for (env, named) in cases {
        let dir = tempfile::tempdir().unwrap();
        let failure = match Server::try_start_with(dir.path(), env) {
            Ok(_) => panic!("the server started with {env:?}"),
            Err(failure) => failure,
        };
        assert!(
            failure.status.is_some_and(|status| !status.success()),
            "the server should exit with an error for {env:?}; output:\n{}",
            failure.logs
        );
        assert!(
            failure.logs.contains(named),
            "the error for {env:?} should name {named}:\n{}",
            failure.logs
        );
    }
}

/// A replica that was down while its shard trimmed and purged its log
/// catches up from a snapshot, which carries the trim marks: it keeps the
/// same newest events as the others and serves the whole history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_carries_trims_to_a_lagging_replica() {
    let _serial = POSTGRES.lock().await;
    let url = fresh_database("snapshot").await;
    let mut env = trim_env(&url, 50);
    env.push(("STARCITE_SNAPSHOT_EVERY", "100".to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut cluster = tokio::task::block_in_place(|| common::cluster::Cluster::start(3, &env));
    let session = "ses-archive-snapshot";
    create_ok(cluster.node(1), session).await;

    let leader = cluster.leader_of(session, 8, Duration::from_secs(10)).await;
    let down = (1..=3u64).find(|node| *node != leader).expect("a follower");
    for n in 1..=100 {
        append_ok(cluster.node(leader), session, event_with_nul(n)).await;
    }
    cluster.node_mut(down).kill9();
    // One append per Raft entry, so that the log passes several snapshots
    // and the purge that follows them.
    for n in 101..=1_500 {
        append_ok(cluster.node(leader), session, event_with_nul(n)).await;
    }
    wait_for_metric(
        cluster.node(leader),
        "starcite_archive_tail_size",
        50.0,
        Duration::from_secs(60),
    )
    .await;
    let reference = tail_collect(
        cluster.node(leader),
        session,
        0,
        1_500,
        Duration::from_secs(60),
    )
    .await;
    common::assert_gapless(&reference, 1, 1_500, "tail from 0 on the leader");

    tokio::task::block_in_place(|| cluster.node_mut(down).restart());
    let frames = tail_collect(
        cluster.node(down),
        session,
        0,
        1_500,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        frames, reference,
        "the restarted replica must serve the same frames as the leader"
    );
    let logs = cluster.node(down).logs();
    assert!(
        logs.contains("snapshot installed"),
        "the restarted replica should have needed a snapshot; its log:\n{logs}"
    );
    wait_for_metric(
        cluster.node(down),
        "starcite_archive_tail_size",
        50.0,
        Duration::from_secs(30),
    )
    .await;
}

/// With Postgres unreachable the server serves at once, and every archive
/// series is listed from the start, so alerts on them can fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_metrics_exist_while_postgres_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let env = archive_env("postgres://starcite@127.0.0.1:1/none");
    let server = tokio::task::block_in_place(|| start(dir.path(), &env));
    create_ok(&server, "ses-archive-unreachable").await;
    append_ok(&server, "ses-archive-unreachable", event(1)).await;

    let metrics = common::metrics_text(&server).await;
    for name in [
        "starcite_archive_pending_rows",
        "starcite_archive_pending_sessions",
        "starcite_archive_attempted_total",
        "starcite_archive_inserted_total",
        "starcite_archive_bytes_attempted_total",
        "starcite_archive_bytes_inserted_total",
        "starcite_archive_flush_duration_ms_count",
        "starcite_archive_lag",
        "starcite_archive_tail_size",
        "starcite_archive_trimmed_total",
    ] {
        assert!(
            common::metric_sum(&metrics, name).is_some(),
            "{name} is missing from /metrics:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("# TYPE starcite_archive_flush_duration_ms histogram"),
        "the flush duration must be a histogram:\n{metrics}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = server.logs();
        if logs.contains("migrating the archive schema failed") && logs.contains("refused") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the log should name the cause of the failed connect:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
