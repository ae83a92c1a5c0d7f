//! Prometheus metrics: names, units and the recorder.

use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const APPENDS: &str = "starcite_events_append_total";
pub const DEDUPED: &str = "starcite_events_deduped_total";
pub const PAYLOAD_BYTES: &str = "starcite_events_payload_bytes";
pub const APPEND_LATENCY: &str = "starcite_append_duration_seconds";
pub const FSYNC_DURATION: &str = "starcite_fsync_duration_seconds";
pub const FSYNC_BATCH: &str = "starcite_fsync_batch_entries";
pub const TAILS: &str = "starcite_tail_connections";
pub const TAIL_CATCH_UPS: &str = "starcite_tail_replays_total";
pub const SHARDS_WITHOUT_LEADER: &str = "starcite_raft_shards_without_leader";
pub const APPLIED_INDEX: &str = "starcite_raft_applied_index";
pub const LEADER_NODE: &str = "starcite_raft_leader_node";
pub const FORWARDED: &str = "starcite_cluster_forwarded_total";
pub const ARCHIVE_ATTEMPTED: &str = "starcite_archive_attempted_total";
pub const ARCHIVE_INSERTED: &str = "starcite_archive_inserted_total";
pub const ARCHIVE_BYTES_ATTEMPTED: &str = "starcite_archive_bytes_attempted_total";
pub const ARCHIVE_BYTES_INSERTED: &str = "starcite_archive_bytes_inserted_total";
pub const ARCHIVE_FLUSH_MS: &str = "starcite_archive_flush_duration_ms";
pub const ARCHIVE_PENDING_SESSIONS: &str = "starcite_archive_pending_sessions";
pub const ARCHIVE_PENDING_ROWS: &str = "starcite_archive_pending_rows";
pub const ARCHIVE_LAG: &str = "starcite_archive_lag";
pub const ARCHIVE_TAIL_SIZE: &str = "starcite_archive_tail_size";
pub const ARCHIVE_TRIMMED: &str = "starcite_archive_trimmed_total";

/// Interval of the recorder's upkeep, which drains recorded histogram samples
/// into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the global recorder and returns the handle that renders `/metrics`.
///
/// `install_recorder` leaves upkeep to the caller, and without it every
/// histogram sample stays in memory until the next scrape: about 16 bytes
/// per append on a server nobody scrapes. [`spawn_upkeep`] runs it.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(PAYLOAD_BYTES.into()),
            &[
                64.0,
                256.0,
                1024.0,
                4096.0,
                16384.0,
                65536.0,
                262_144.0,
                1_048_576.0,
                4_194_304.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(ARCHIVE_FLUSH_MS.into()),
            &[
                1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
                30000.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(FSYNC_BATCH.into()),
            &[
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
            ],
        )?
        .install_recorder()?;
    describe();
    register();
    Ok(handle)
}

fn describe() {
    describe_counter!(
        APPENDS,
        "Events appended (not counting deduplicated retries)."
    );
    describe_counter!(
        DEDUPED,
        "Appends answered from an earlier event with the same idempotency key."
    );
    describe_histogram!(
        PAYLOAD_BYTES,
        Unit::Bytes,
        "Size of each appended event's payload as JSON."
    );
    describe_histogram!(
        APPEND_LATENCY,
        Unit::Seconds,
        "Time from receiving an append to its acknowledgement."
    );
    describe_histogram!(
        FSYNC_DURATION,
        Unit::Seconds,
        "Duration of each journal fsync."
    );
    describe_histogram!(FSYNC_BATCH, "Raft log entries made durable by each fsync.");
    describe_gauge!(TAILS, "Open tail WebSocket connections.");
    describe_counter!(
        TAIL_CATCH_UPS,
        "Times a tail went back to storage after missing live events."
    );
    describe_gauge!(
        SHARDS_WITHOUT_LEADER,
        "Shards on this node that currently have no Raft leader."
    );
    describe_gauge!(
        APPLIED_INDEX,
        "Last Raft log index applied by each shard's state machine."
    );
    describe_counter!(
        FORWARDED,
        "Requests forwarded to a shard leader on another node, by kind (write, read) and result: \
         answered (the peer replied, possibly naming another leader), not_delivered (not carried \
         out, so retried), no_answer (outcome unknown, so the client got 503)."
    );
    describe_gauge!(
        LEADER_NODE,
        "Node id of each hosted shard's current leader; 0 while it has none."
    );
    describe_archive();
}

/// Describes the archive's series, which exist only while the archive is on.
fn describe_archive() {
    describe_counter!(
        ARCHIVE_ATTEMPTED,
        "Events this node sent to the Postgres archive, repeats included."
    );
    describe_counter!(
        ARCHIVE_INSERTED,
        "Events the Postgres archive took as new rows."
    );
    describe_counter!(
        ARCHIVE_BYTES_ATTEMPTED,
        Unit::Bytes,
        "Frame bytes of the events sent to the Postgres archive."
    );
    describe_counter!(
        ARCHIVE_BYTES_INSERTED,
        Unit::Bytes,
        "Frame bytes of the events the Postgres archive took as new rows."
    );
    describe_histogram!(
        ARCHIVE_FLUSH_MS,
        Unit::Milliseconds,
        "Duration of one archive flush."
    );
    describe_gauge!(
        ARCHIVE_PENDING_SESSIONS,
        "Sessions with events not yet archived, after the last flush."
    );
    describe_gauge!(
        ARCHIVE_PENDING_ROWS,
        "Events not yet archived of the sessions this node archives, after the last flush."
    );
    describe_gauge!(
        ARCHIVE_LAG,
        "Events not yet archived of the session furthest behind, after the last flush."
    );
    describe_gauge!(
        ARCHIVE_TAIL_SIZE,
        "Events kept in this node's local store (the hot tier), over all sessions."
    );
    describe_counter!(
        ARCHIVE_TRIMMED,
        "Archived events deleted from this node's local store."
    );
}

/// Runs the recorder's upkeep every few seconds for the life of the process.
/// Must be called from within the async runtime.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            interval.tick().await;
            handle.run_upkeep();
        }
    });
}

/// Creates every series at zero, so `/metrics` lists them before the first
/// append or tail.
fn register() {
    counter!(APPENDS).increment(0);
    counter!(DEDUPED).increment(0);
    counter!(TAIL_CATCH_UPS).increment(0);
    gauge!(TAILS).set(0.0);
    gauge!(SHARDS_WITHOUT_LEADER).set(0.0);
    let _ = histogram!(PAYLOAD_BYTES);
    let _ = histogram!(APPEND_LATENCY);
    let _ = histogram!(FSYNC_DURATION);
    let _ = histogram!(FSYNC_BATCH);
}

pub fn record_append(payload_bytes: usize, latency: Duration) {
    counter!(APPENDS).increment(1);
    histogram!(PAYLOAD_BYTES).record(payload_bytes as f64);
    histogram!(APPEND_LATENCY).record(latency.as_secs_f64());
}

pub fn record_deduped() {
    counter!(DEDUPED).increment(1);
}

pub fn record_fsync(entries: usize, duration: Duration) {
    histogram!(FSYNC_BATCH).record(entries as f64);
    histogram!(FSYNC_DURATION).record(duration.as_secs_f64());
}

pub fn record_tail_replay() {
    counter!(TAIL_CATCH_UPS).increment(1);
}

/// Health of one shard's Raft group, as sampled for the gauges.
pub struct ShardHealth {
    pub shard: u32,
    pub has_leader: bool,
    /// The leader's node id, if known.
    pub leader: Option<u64>,
    pub applied_index: u64,
}

pub fn record_raft_health(shards: &[ShardHealth]) {
    let without_leader = shards.iter().filter(|shard| !shard.has_leader).count();
    gauge!(SHARDS_WITHOUT_LEADER).set(without_leader as f64);
    for shard in shards {
        let label = shard.shard.to_string();
        gauge!(APPLIED_INDEX, "shard" => label.clone()).set(shard.applied_index as f64);
        gauge!(LEADER_NODE, "shard" => label).set(shard.leader.unwrap_or(0) as f64);
    }
}

pub fn record_archive_attempt(rows: usize, bytes: usize) {
    counter!(ARCHIVE_ATTEMPTED).increment(rows as u64);
    counter!(ARCHIVE_BYTES_ATTEMPTED).increment(bytes as u64);
}

pub fn record_archive_inserted(rows: usize, bytes: usize) {
    counter!(ARCHIVE_INSERTED).increment(rows as u64);
    counter!(ARCHIVE_BYTES_INSERTED).increment(bytes as u64);
}

/// Records one archive flush: its duration and what it left pending (the
/// rows of the sessions this node archives, and the most of one session).
pub fn record_archive_flush(
    duration: std::time::Duration,
    pending_sessions: usize,
    pending_rows: u64,
    lag: u64,
) {
    histogram!(ARCHIVE_FLUSH_MS).record(duration.as_secs_f64() * 1000.0);
    gauge!(ARCHIVE_PENDING_SESSIONS).set(pending_sessions as f64);
    gauge!(ARCHIVE_PENDING_ROWS).set(pending_rows as f64);
    gauge!(ARCHIVE_LAG).set(lag as f64);
}

/// Creates every archive series at zero, so that `/metrics` lists them
/// (and alerts on them work) before the first flush, even while Postgres
/// is unreachable.
pub fn register_archive() {
    for name in [
        ARCHIVE_ATTEMPTED,
        ARCHIVE_INSERTED,
        ARCHIVE_BYTES_ATTEMPTED,
        ARCHIVE_BYTES_INSERTED,
        ARCHIVE_TRIMMED,
    ] {
        counter!(name).increment(0);
    }
    for name in [
        ARCHIVE_PENDING_SESSIONS,
        ARCHIVE_PENDING_ROWS,
        ARCHIVE_LAG,
        ARCHIVE_TAIL_SIZE,
    ] {
        gauge!(name).set(0.0);
    }
    let _ = histogram!(ARCHIVE_FLUSH_MS);
}

pub fn record_archive_trimmed(events: u64) {
    counter!(ARCHIVE_TRIMMED).increment(events);
}

pub fn record_archive_tail_size(events: u64) {
    gauge!(ARCHIVE_TAIL_SIZE).set(events as f64);
}

pub fn record_forward(kind: &'static str, result: &'static str) {
    counter!(FORWARDED, "kind" => kind, "result" => result).increment(1);
}

pub fn tail_opened() {
    gauge!(TAILS).increment(1.0);
}

pub fn tail_closed() {
    gauge!(TAILS).decrement(1.0);
}
