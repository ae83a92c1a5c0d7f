//! The optional Postgres archive: committed events copied, in the
//! background, into tables that teams query with plain SQL.
//!
//! Appends never wait for Postgres. The state machine reports every applied
//! event through [`ArchiveSink`], which marks its session as pending. Every
//! flush interval, the archiver copies the pending sessions of the shards
//! this node leads from the local store into Postgres, in one transaction
//! per session batch: the session row, the events (`ON CONFLICT DO
//! NOTHING`, so delivery is at least once and repeats are harmless) and the
//! session's `archived_seq`. A failure leaves the session pending, and the
//! archiver retries with backoff until Postgres is back.

mod schema;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::consensus::state_machine::read_header;
use crate::consensus::{AppliedEvent, EventSink};
use crate::storage::{keys, Store};

/// Settings of the archiver.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    pub database_url: String,
    pub flush_interval: Duration,
    /// Events per session and transaction at most.
    pub batch_size: usize,
    pub pool_size: usize,
}

/// Sessions with events not yet archived, with the highest seq applied.
#[derive(Clone, Default)]
pub struct Pending(Arc<Mutex<HashMap<String, u64>>>);

impl Pending {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        // Every critical section is one map operation, so a poisoned map is intact.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn mark(&self, session_id: &str, seq: u64) {
        raise(&mut self.lock(), session_id, seq);
    }

    fn take(&self) -> HashMap<String, u64> {
        std::mem::take(&mut *self.lock())
    }
}

/// Passes applied events on to `inner` (the live hub) and marks their
/// sessions as pending for the archiver.
pub struct ArchiveSink {
    pub inner: Arc<dyn EventSink>,
    pub pending: Pending,
}

impl EventSink for ArchiveSink {
    fn publish(&self, events: Vec<AppliedEvent>) {
        // One lock per applied batch: this runs on the apply path.
        {
            let mut pending = self.pending.lock();
            for event in &events {
                raise(&mut pending, &event.session_id, event.seq);
            }
        }
        self.inner.publish(events);
    }
}

/// Raises a session's pending seq, allocating its id only the first time.
fn raise(pending: &mut HashMap<String, u64>, session_id: &str, seq: u64) {
    match pending.get_mut(session_id) {
        Some(highest) => *highest = (*highest).max(seq),
        None => {
            pending.insert(session_id.to_string(), seq);
        }
    }
}

/// Tells whether this node leads the shard of a session, so that exactly one
/// replica archives it.
pub type LeadsSession = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The archiver task's state.
pub struct Archiver {
    settings: ArchiveSettings,
    store: Store,
    pending: Pending,
    leads: LeadsSession,
    pool: deadpool_postgres::Pool,
    /// `archived_seq` of the sessions archived by this node, as last written.
    archived: HashMap<String, u64>,
}

/// Failure to archive a session in this flush.
#[derive(Debug, thiserror::Error)]
enum ArchiveError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres connection pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("local store: {0}")]
    Store(String),
}

impl Archiver {
    /// Starts the archiver in the background. It migrates the schema first,
    /// retrying while Postgres is unreachable, then flushes every interval
    /// until `shutdown`, and once more after it.
    pub fn start(
        settings: ArchiveSettings,
        store: Store,
        pending: Pending,
        leads: LeadsSession,
        shutdown: CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let pool = pool(&settings)?;
        let archiver = Archiver {
            settings,
            store,
            pending,
            leads,
            pool,
            archived: HashMap::new(),
        };
        Ok(tokio::spawn(archiver.run(shutdown)))
    }

    async fn run(mut self, shutdown: CancellationToken) {
        if !self.migrate_until_done(&shutdown).await {
            return;
        }
        self.mark_stored_sessions().await;
        info!(
            flush_interval_ms = self.settings.flush_interval.as_millis() as u64,
            "archiver started"
        );

        let mut backoff = Backoff::default();
        loop {
            let wait = backoff.current().unwrap_or(self.settings.flush_interval);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.flush().await {
                Ok(()) => backoff.reset(),
                Err(err) => {
                    let delay = backoff.next();
                    warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "archive flush failed; retrying");
                }
            }
        }

        if let Err(err) = self.flush().await {
            warn!(error = %err, "final archive flush failed; the next start archives the rest");
        }
        info!("archiver stopped");
    }

    /// Applies the schema migrations, retrying with backoff. Returns false
    /// when shutdown came first.
    async fn migrate_until_done(&self, shutdown: &CancellationToken) -> bool {
        let mut backoff = Backoff::default();
        loop {
            match self.migrate().await {
                Ok(version) => {
                    info!(version, "archive schema ready");
                    return true;
                }
                Err(err) => {
                    let delay = backoff.next();
                    warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "migrating the archive schema failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn migrate(&self) -> Result<i32, ArchiveError> {
        let (mut client, connection) =
            tokio_postgres::connect(&self.settings.database_url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(error = %err, "migration connection closed");
            }
        });
        let version = schema::migrate(&mut client).await;
        drop(client);
        let _ = driver.await;
        Ok(version?)
    }

    /// Marks every session in the local store as pending, so that events
    /// applied before this start (and not archived yet) are archived too.
    async fn mark_stored_sessions(&self) {
        let store = self.store.clone();
        let pending = self.pending.clone();
        let marked = tokio::task::spawn_blocking(move || {
            let mut count = 0usize;
            for item in store.sessions.iter() {
                let Ok((key, _)) = item else { continue };
                let id = String::from_utf8_lossy(&key).into_owned();
                let last_seq = match read_header(&store, &id) {
                    Ok(Some(header)) => header.last_seq,
                    _ => continue,
                };
                pending.mark(&id, last_seq);
                count += 1;
            }
            count
        })
        .await
        .unwrap_or(0);
        debug!(sessions = marked, "stored sessions queued for archiving");
    }

    /// Archives every pending session this node leads. Sessions that fail
    /// or have more events than one batch stay pending.
    async fn flush(&mut self) -> Result<(), ArchiveError> {
        let started = Instant::now();
        let pending = self.pending.take();
        let mut result = Ok(());
        let mut backlog = Backlog::default();
        let mut followed = Vec::new();
        for (session_id, seq) in &pending {
            if !(self.leads)(session_id) {
                followed.push((session_id.clone(), *seq));
                continue;
            }
            if result.is_err() {
                self.pending.mark(session_id, *seq);
                backlog.add(self.estimate_left(session_id, *seq));
                continue;
            }
            match self.archive_session(session_id).await {
                Ok(0) => {}
                Ok(left) => {
                    self.pending.mark(session_id, *seq);
                    backlog.add(left);
                }
                Err(err) => {
                    self.pending.mark(session_id, *seq);
                    backlog.add(self.estimate_left(session_id, *seq));
                    result = Err(err);
                }
            }
        }
        backlog.sessions += self.keep_unarchived(followed).await;
        crate::metrics::record_archive_flush(
            started.elapsed(),
            backlog.sessions,
            backlog.rows,
            backlog.largest,
        );
        result
    }

    /// Estimates the events of a session not archived yet from this node's
    /// own record, without a query to Postgres.
    fn estimate_left(&self, session_id: &str, applied: u64) -> u64 {
        applied.saturating_sub(self.archived.get(session_id).copied().unwrap_or(0))
    }

    /// Keeps pending the sessions another node leads until their leader has
    /// archived them, so that this node archives them if it becomes leader
    /// first. Returns how many stay pending.
    async fn keep_unarchived(&self, followed: Vec<(String, u64)>) -> usize {
        if followed.is_empty() {
            return 0;
        }
        let ids: Vec<&str> = followed.iter().map(|(id, _)| id.as_str()).collect();
        let archived: HashMap<String, u64> = match self.pool.get().await {
            Ok(client) => match client
                .query(
                    "SELECT id, archived_seq FROM sessions WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
            {
                Ok(rows) => rows
                    .iter()
                    .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1) as u64))
                    .collect(),
                Err(err) => {
                    debug!(error = %err, "reading archived_seq of followed sessions failed");
                    HashMap::new()
                }
            },
            Err(err) => {
                debug!(error = %err, "no Postgres connection for followed sessions");
                HashMap::new()
            }
        };

        let mut still_pending = 0;
        for (session_id, seq) in followed {
            if archived.get(&session_id).copied().unwrap_or(0) < seq {
                self.pending.mark(&session_id, seq);
                still_pending += 1;
            }
        }
        still_pending
    }

    /// Copies the next batch of a session's unarchived events. Returns how
    /// many of its events are still not archived (0 when it is complete).
    async fn archive_session(&mut self, session_id: &str) -> Result<u64, ArchiveError> {
        let header = read_header(&self.store, session_id)
            .map_err(|err| ArchiveError::Store(err.to_string()))?;
        let Some(header) = header else {
            return Ok(0);
        };

        let mut client = self.pool.get().await?;
        let archived = match self.archived.get(session_id) {
            Some(seq) => *seq,
            None => {
                let row = client
                    .query_opt(
                        "SELECT archived_seq FROM sessions WHERE id = $1",
                        &[&session_id],
                    )
                    .await?;
                row.map_or(0, |row| row.get::<_, i64>(0) as u64)
            }
        };

        let upto = header
            .last_seq
            .min(archived.saturating_add(self.settings.batch_size as u64));
        let rows = self.read_events(session_id, archived + 1, upto)?;
        let expected = upto.saturating_sub(archived) as usize;
        if rows.len() != expected {
            return Err(ArchiveError::Store(format!(
                "session {session_id:?} has {} of the {expected} events after seq {archived} in the local store",
                rows.len()
            )));
        }
        let bytes: usize = rows.iter().map(|row| row.bytes).sum();
        crate::metrics::record_archive_attempt(rows.len(), bytes);

        let transaction = client.transaction().await?;
        transaction
            .execute(
                "INSERT INTO sessions (id, title, metadata, created_at, updated_at)
                 VALUES ($1, $2, $3::text::jsonb,
                         timestamptz 'epoch' + $4::bigint * interval '1 microsecond',
                         timestamptz 'epoch' + $5::bigint * interval '1 microsecond')
                 ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title,
                     metadata = EXCLUDED.metadata, updated_at = EXCLUDED.updated_at",
                &[
                    &session_id,
                    &header.title,
                    &header.metadata,
                    &(header.created_at as i64),
                    &(header.updated_at as i64),
                ],
            )
            .await?;
        let inserted = insert_events(&transaction, session_id, &rows).await?;
        transaction
            .execute(
                "UPDATE sessions SET archived_seq = greatest(archived_seq, $2) WHERE id = $1",
                &[&session_id, &(upto as i64)],
            )
            .await?;
        transaction.commit().await?;

        crate::metrics::record_archive_inserted(inserted as usize, bytes);
        self.archived.insert(session_id.to_string(), upto);
        debug!(
            session_id,
            from = archived + 1,
            to = upto,
            inserted,
            "events archived"
        );
        Ok(header.last_seq.saturating_sub(upto))
    }

    /// Reads events `from..=to` of a session from the local store.
    fn read_events(&self, session_id: &str, from: u64, to: u64) -> Result<Vec<Row>, ArchiveError> {
        if from > to {
            return Ok(Vec::new());
        }
        let start = keys::event(session_id, from);
        let end = keys::event(session_id, to);
        let mut rows = Vec::new();
        for item in self.store.events.range(start..=end) {
            let (key, frame) = item.map_err(|err| ArchiveError::Store(err.to_string()))?;
            let seq = keys::event_seq(&key)
                .ok_or_else(|| ArchiveError::Store("event key too short".to_string()))?;
            let value: Value = serde_json::from_slice(&frame).map_err(|err| {
                ArchiveError::Store(format!(
                    "stored event {session_id}/{seq} is not JSON: {err}"
                ))
            })?;
            rows.push(Row::from_frame(seq, value, frame.len()));
        }
        Ok(rows)
    }
}

/// Unarchived events after a flush, over the sessions this node archives.
#[derive(Default)]
struct Backlog {
    sessions: usize,
    rows: u64,
    /// Unarchived events of the session furthest behind.
    largest: u64,
}

impl Backlog {
    fn add(&mut self, rows: u64) {
        self.sessions += 1;
        self.rows += rows;
        self.largest = self.largest.max(rows);
    }
}

/// One event as archived.
struct Row {
    seq: i64,
    kind: String,
    payload: Value,
    actor: String,
    source: Option<String>,
    metadata: Value,
    refs: Value,
    idempotency_key: Option<String>,
    inserted_at: String,
    bytes: usize,
}

impl Row {
    fn from_frame(seq: u64, mut frame: Value, bytes: usize) -> Row {
        let mut take = |name: &str| frame.get_mut(name).map(Value::take).unwrap_or(Value::Null);
        let text = |value: Value| match value {
            Value::String(text) => Some(text),
            _ => None,
        };
        Row {
            seq: seq as i64,
            kind: text(take("type")).unwrap_or_default(),
            payload: take("payload"),
            actor: text(take("actor")).unwrap_or_default(),
            source: text(take("source")),
            metadata: take("metadata"),
            refs: take("refs"),
            idempotency_key: text(take("idempotency_key")),
            inserted_at: text(take("inserted_at")).unwrap_or_default(),
            bytes,
        }
    }
}

/// Inserts `rows` in one statement; rows already archived are skipped.
/// Returns how many were new.
async fn insert_events(
    transaction: &deadpool_postgres::Transaction<'_>,
    session_id: &str,
    rows: &[Row],
) -> Result<u64, tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(0);
    }

    // One array per column, unnested into rows by Postgres.
    let sessions: Vec<&str> = rows.iter().map(|_| session_id).collect();
    let seqs: Vec<i64> = rows.iter().map(|row| row.seq).collect();
    let kinds: Vec<&str> = rows.iter().map(|row| row.kind.as_str()).collect();
    let payloads: Vec<&Value> = rows.iter().map(|row| &row.payload).collect();
    let actors: Vec<&str> = rows.iter().map(|row| row.actor.as_str()).collect();
    let sources: Vec<Option<&str>> = rows.iter().map(|row| row.source.as_deref()).collect();
    let metadata: Vec<&Value> = rows.iter().map(|row| &row.metadata).collect();
    let refs: Vec<&Value> = rows.iter().map(|row| &row.refs).collect();
    let keys: Vec<Option<&str>> = rows
        .iter()
        .map(|row| row.idempotency_key.as_deref())
        .collect();
    let inserted_at: Vec<&str> = rows.iter().map(|row| row.inserted_at.as_str()).collect();

    transaction
        .execute(
            "INSERT INTO events (session_id, seq, type, payload, actor, source, metadata, refs,
                                 idempotency_key, inserted_at)
             SELECT s, q, t, p, a, so, m, r, k, i::timestamptz
             FROM unnest($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::text[],
                         $6::text[], $7::jsonb[], $8::jsonb[], $9::text[], $10::text[])
                  AS u(s, q, t, p, a, so, m, r, k, i)
             ON CONFLICT (session_id, seq) DO NOTHING",
            &[
                &sessions,
                &seqs,
                &kinds,
                &payloads,
                &actors,
                &sources,
                &metadata,
                &refs,
                &keys,
                &inserted_at,
            ],
        )
        .await
}

fn pool(settings: &ArchiveSettings) -> anyhow::Result<deadpool_postgres::Pool> {
    let mut config = deadpool_postgres::Config::new();
    config.url = Some(settings.database_url.clone());
    config.pool = Some(deadpool_postgres::PoolConfig::new(settings.pool_size));
    config
        .create_pool(
            Some(deadpool_postgres::Runtime::Tokio1),
            tokio_postgres::NoTls,
        )
        .map_err(|err| {
            anyhow::anyhow!("configuring the Postgres pool failed: {err}; check DATABASE_URL")
        })
}

/// Doubling delays between failed attempts, from 0.5 s up to 16 s.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.current().unwrap_or(Duration::from_millis(500))
    }

    fn current(&self) -> Option<Duration> {
        if self.failures == 0 {
            return None;
        }
        let millis = 500u64.saturating_mul(1 << self.failures.min(6).saturating_sub(1));
        Some(Duration::from_millis(millis))
    }

    fn reset(&mut self) {
        if self.failures > 0 {
            info!("archive flush succeeded again");
        }
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_thirty_seconds() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.current(), None, "no delay before a failure");
        let delays: Vec<u64> = (0..8).map(|_| backoff.next().as_millis() as u64).collect();
        assert_eq!(
            delays,
            vec![500, 1000, 2000, 4000, 8000, 16000, 16000, 16000]
        );
        backoff.reset();
        assert_eq!(backoff.current(), None, "reset clears the delay");
    }

    #[test]
    fn frame_fields_become_columns() {
        let frame = serde_json::json!({
            "seq": 3, "type": "t", "payload": {"a": 1}, "actor": "agent:x",
            "source": null, "metadata": {}, "refs": {"to_seq": 1},
            "idempotency_key": "k", "inserted_at": "2026-12-04T21:00:00Z"
        });
        let row = Row::from_frame(3, frame, 10);
        assert_eq!(row.kind, "t");
        assert_eq!(row.payload, serde_json::json!({"a": 1}));
        assert_eq!(row.source, None, "a null source is stored as NULL");
        assert_eq!(row.idempotency_key.as_deref(), Some("k"));
        assert_eq!(row.inserted_at, "2026-12-04T21:00:00Z");
    }
}
