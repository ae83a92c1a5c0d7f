//! The optional Postgres archive: committed events copied, in the
//! background, into tables that teams query with plain SQL, after which the
//! local store keeps only the newest events of each session.
//!
//! Appends never wait for Postgres. The state machine reports every applied
//! event through [`ArchiveSink`], which marks its session as pending. Every
//! flush interval, the archiver copies the pending sessions of the shards
//! this node leads from the local store into Postgres, in one transaction
//! per session batch: the session row, the events (`ON CONFLICT DO
//! NOTHING`, so delivery is at least once and repeats are harmless) and the
//! session's `archived_seq`. A failure leaves the session pending, and the
//! archiver retries with backoff until Postgres is back.
//!
//! Once a session's archived events are more than `tail_keep` behind its
//! last seq, the archiver sends the new `archived_seq` through the shard's
//! Raft log, and every replica deletes the events that are both archived
//! and older than the newest `tail_keep`
//! ([`crate::session::retention::ArchiveMark`]). Tails that start
//! below the local frontier read those events back with [`ColdReader`].

mod cold;
mod hot;
mod rows;
mod schema;
mod trim;

pub use cold::{ColdError, ColdReader, PageLimit};
pub use hot::{scan, HotEvents, StoredSessions};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cluster::Router;
use crate::consensus::state_machine::{read_header, read_mark};
use crate::consensus::{AppliedEvent, EventSink};
use crate::storage::{keys, Store};
use rows::{clean_text, insert_events, Row};

/// Settings of the archiver.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    pub database_url: String,
    pub flush_interval: Duration,
    /// Events per session written to Postgres in one transaction at most.
    pub batch_size: usize,
    pub pool_size: usize,
    /// Newest events of each session that stay in the local store after
    /// they are archived.
    pub tail_keep: u64,
}

/// `archived_seq` values remembered at most; past it the record starts over
/// and is filled again from Postgres.
const ARCHIVED_CACHE_LIMIT: usize = 100_000;

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

    pub fn mark(&self, session_id: &str, seq: u64) {
        raise(&mut self.lock(), session_id, seq);
    }

    fn take(&self) -> HashMap<String, u64> {
        std::mem::take(&mut *self.lock())
    }
}

/// Passes applied events on to `inner` (the live hub), marks their
/// sessions as pending for the archiver and counts the local store's events.
pub struct ArchiveSink {
    pub inner: Arc<dyn EventSink>,
    pub pending: Pending,
    pub hot: HotEvents,
}

impl ArchiveSink {
    /// Marks the sessions of `events` as pending, taking the lock once:
    /// this runs on the apply path.
    fn mark_pending(&self, events: &[AppliedEvent]) {
        let mut pending = self.pending.lock();
        for event in events {
            raise(&mut pending, &event.session_id, event.seq);
        }
    }
}

impl EventSink for ArchiveSink {
    fn publish(&self, events: Vec<AppliedEvent>) {
        self.mark_pending(&events);
        if let Some(first) = events.first() {
            // Every event of one applied batch is of the same shard.
            let shard = keys::shard_of(&first.session_id, self.hot.shard_count());
            self.hot.add(shard, events.len() as i64);
        }
        self.inner.publish(events);
    }

    fn trimmed(&self, shard: u32, sessions: &[(String, u64)]) {
        let events: u64 = sessions.iter().map(|(_, count)| count).sum();
        self.hot.add(shard, -(events as i64));
        crate::metrics::record_archive_trimmed(events);
    }

    fn replaced(&self, shard: u32, stored: u64, newest: Vec<AppliedEvent>) {
        self.mark_pending(&newest);
        self.hot.set(shard, stored as i64);
        if !newest.is_empty() {
            self.inner.publish(newest);
        }
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

/// Maximum time one batch of a session may take to reach Postgres before
/// the flush gives up and retries later. A batch normally takes
/// milliseconds, so this only ends a connection to a Postgres that stopped
/// responding.
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Run first in every transaction of the archive. A timed-out call drops
/// its future without cancelling the statement on the server, whose
/// transaction then holds its row locks until it is rolled back. These
/// limits make Postgres end such a statement or transaction after
/// [`BATCH_TIMEOUT`]. They are set with `SET LOCAL` rather than as
/// connection options, which poolers such as PgBouncer may reject.
pub(crate) const TRANSACTION_LIMITS: &str = "SET LOCAL statement_timeout = 60000; \
     SET LOCAL idle_in_transaction_session_timeout = 60000";

/// Maximum wait for a Postgres connection: for a free one from the pool,
/// or for a new one to connect. A Postgres that drops packets instead of
/// refusing connections then fails a flush or a cold read in seconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates the connection pool shared by the archiver and cold reads. No
/// connection is opened until one is needed. A `connect_timeout` in the URL
/// takes precedence over [`CONNECT_TIMEOUT`].
pub fn pool(settings: &ArchiveSettings) -> anyhow::Result<deadpool_postgres::Pool> {
    let mut config: tokio_postgres::Config = settings.database_url.parse().map_err(|err| {
        anyhow::anyhow!("DATABASE_URL is not a valid Postgres URL: {err}; expected postgres://user:password@host:port/database")
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // Keepalives notice a Postgres host that vanished while a connection idles.
    config.keepalives_idle(Duration::from_secs(30));
    // Verified recycling runs a round trip before a connection is reused,
    // so one still busy with a timed-out statement fails the recycle
    // timeout and is dropped instead of stalling the next caller.
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Verified,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(settings.pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|err| anyhow::anyhow!("configuring the Postgres pool failed: {err}"))
}

/// The archiver task's state.
pub struct Archiver {
    settings: ArchiveSettings,
    store: Store,
    pending: Pending,
    router: Arc<Router>,
    pool: deadpool_postgres::Pool,
    hot: HotEvents,
    /// `archived_seq` of the sessions archived by this node, as last written.
    archived: HashMap<String, u64>,
    /// Trims this node's flushes made possible, until the shard's log has
    /// taken them.
    trims: trim::TrimQueue,
}

/// Failure to archive a session in this flush.
#[derive(Debug, thiserror::Error)]
enum ArchiveError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no Postgres connection available: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("local store: {0}")]
    Store(String),
    #[error("writing one batch to Postgres took longer than {0:?}")]
    TimedOut(Duration),
}

/// Handles and settings the archiver starts with.
pub struct ArchiverParts {
    pub settings: ArchiveSettings,
    pub store: Store,
    pub pending: Pending,
    pub router: Arc<Router>,
    pub pool: deadpool_postgres::Pool,
    pub hot: HotEvents,
}

impl Archiver {
    /// Starts the archiver in the background. It migrates the schema first,
    /// retrying while Postgres is unreachable, then flushes every interval
    /// until `shutdown`, and once more after it.
    pub fn start(parts: ArchiverParts, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        crate::metrics::register_archive();
        crate::metrics::record_archive_tail_size(parts.hot.total());
        let archiver = Archiver {
            settings: parts.settings,
            store: parts.store,
            pending: parts.pending,
            router: parts.router,
            pool: parts.pool,
            hot: parts.hot,
            archived: HashMap::new(),
            trims: trim::TrimQueue::default(),
        };
        tokio::spawn(archiver.run(shutdown))
    }

    async fn run(mut self, shutdown: CancellationToken) {
        if !self.migrate_until_done(&shutdown).await {
            return;
        }
        info!(
            flush_interval_ms = self.settings.flush_interval.as_millis() as u64,
            tail_keep = self.settings.tail_keep,
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
                    warn!(error = %error_chain(&err), retry_in_ms = delay.as_millis() as u64, "archive flush failed; retrying");
                }
            }
        }

        if let Err(err) = self.flush().await {
            warn!(error = %error_chain(&err), "final archive flush failed; the next start archives the rest");
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
                    warn!(error = %error_chain(&err), retry_in_ms = delay.as_millis() as u64, "migrating the archive schema failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn migrate(&self) -> Result<i32, ArchiveError> {
        let mut client = self.pool.get().await?;
        tokio::time::timeout(BATCH_TIMEOUT, schema::migrate(&mut client))
            .await
            .map_err(|_| ArchiveError::TimedOut(BATCH_TIMEOUT))?
            .map_err(ArchiveError::from)
    }

    /// Archives every pending session this node leads, then sends the trims
    /// that became possible. Sessions that fail, or still have events left
    /// when the flush interval has passed, stay pending.
    async fn flush(&mut self) -> Result<(), ArchiveError> {
        let started = Instant::now();
        let pending = self.pending.take();
        let mut result = Ok(());
        let mut backlog = Backlog::default();
        let mut followed = Vec::new();
        if self.archived.len() > ARCHIVED_CACHE_LIMIT {
            self.archived.clear();
        }
        for (session_id, seq) in &pending {
            if !self.router.leads_session(session_id) {
                // Another node archives it now; what this node remembers of
                // it may fall behind.
                self.archived.remove(session_id);
                followed.push((session_id.clone(), *seq));
                continue;
            }
            if result.is_err() {
                self.pending.mark(session_id, *seq);
                backlog.add(self.estimate_left(session_id, *seq));
                continue;
            }
            let deadline = started + self.settings.flush_interval;
            match self.archive_session_batches(session_id, deadline).await {
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
        self.trims
            .send(&self.store, &self.router, self.settings.tail_keep)
            .await;
        crate::metrics::record_archive_flush(
            started.elapsed(),
            backlog.sessions,
            backlog.rows,
            backlog.largest,
        );
        crate::metrics::record_archive_tail_size(self.hot.total());
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
        let archived = match tokio::time::timeout(BATCH_TIMEOUT, self.archived_seqs(&ids)).await {
            Ok(Ok(archived)) => archived,
            Ok(Err(err)) => {
                debug!(error = %error_chain(&err), "reading archived_seq of followed sessions failed");
                HashMap::new()
            }
            Err(_) => {
                debug!(
                    timeout_ms = BATCH_TIMEOUT.as_millis() as u64,
                    "reading archived_seq of followed sessions timed out"
                );
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

    /// Reads `archived_seq` of the given sessions from Postgres.
    async fn archived_seqs(&self, ids: &[&str]) -> Result<HashMap<String, u64>, ArchiveError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, archived_seq FROM sessions WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1) as u64))
            .collect())
    }

    /// Copies a session's unarchived events batch after batch until none is
    /// left or `deadline` passes, so that one busy session is not limited
    /// to one batch per flush interval. Returns how many are still left.
    async fn archive_session_batches(
        &mut self,
        session_id: &str,
        deadline: Instant,
    ) -> Result<u64, ArchiveError> {
        loop {
            let left = tokio::time::timeout(BATCH_TIMEOUT, self.archive_session(session_id))
                .await
                .map_err(|_| ArchiveError::TimedOut(BATCH_TIMEOUT))??;
            if left == 0 || Instant::now() >= deadline {
                return Ok(left);
            }
        }
    }

    /// Copies the next batch of a session's unarchived events. Returns how
    /// many of its events are still not archived (0 when it is complete).
    async fn archive_session(&mut self, session_id: &str) -> Result<u64, ArchiveError> {
        let header = read_header(&self.store, session_id)
            .map_err(|err| ArchiveError::Store(err.to_string()))?;
        let Some(header) = header else {
            return Ok(0);
        };

        let mark = read_mark(&self.store, session_id)
            .map_err(|err| ArchiveError::Store(err.to_string()))?
            .unwrap_or_default();
        let mut client = self.pool.get().await?;
        let known = self
            .archived_seq(&client, session_id, mark.trimmed_through)
            .await?;
        if let Some(archived) = known.filter(|archived| *archived >= header.last_seq) {
            // Postgres has it all, possibly more than this replica applied
            // yet (it was not the leader a moment ago). The trim may still be
            // due: archived by a build that did not trim, under a larger
            // keep count, or by a leader that died before sending it.
            self.archived.insert(session_id.to_string(), archived);
            self.trims.schedule(
                session_id,
                mark,
                archived,
                header.last_seq,
                self.settings.tail_keep,
            );
            return Ok(0);
        }
        let archived = skip_trimmed(session_id, known.unwrap_or(0), mark.trimmed_through);

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

        let metadata = clean_json_text(&header.metadata);
        let title = header.title.as_deref().map(clean_text);
        let transaction = client.transaction().await?;
        transaction.batch_execute(TRANSACTION_LIMITS).await?;
        transaction
            .execute(
                "INSERT INTO sessions (id, title, metadata, created_at, updated_at)
                 VALUES ($1, $2, $3::text::jsonb,
                         timestamptz 'epoch' + $4::bigint * interval '1 microsecond',
                         timestamptz 'epoch' + $5::bigint * interval '1 microsecond')
                 ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title,
                     metadata = EXCLUDED.metadata,
                     updated_at = greatest(sessions.updated_at, EXCLUDED.updated_at)",
                &[
                    &session_id,
                    &title.as_deref(),
                    &metadata.as_ref(),
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
        self.trims.schedule(
            session_id,
            mark,
            upto,
            header.last_seq,
            self.settings.tail_keep,
        );
        debug!(
            session_id,
            from = archived + 1,
            to = upto,
            inserted,
            "events archived"
        );
        Ok(header.last_seq.saturating_sub(upto))
    }

    /// Returns the session's `archived_seq`, or `None` when Postgres has no
    /// row for it yet. This node's record is used unless it lies below the
    /// trimmed seq: then another leader archived further meanwhile, and
    /// Postgres is asked.
    async fn archived_seq(
        &self,
        client: &deadpool_postgres::Object,
        session_id: &str,
        trimmed_through: u64,
    ) -> Result<Option<u64>, ArchiveError> {
        if let Some(seq) = self.archived.get(session_id) {
            if *seq >= trimmed_through {
                return Ok(Some(*seq));
            }
        }
        let row = client
            .query_opt(
                "SELECT archived_seq FROM sessions WHERE id = $1",
                &[&session_id],
            )
            .await?;
        Ok(row.map(|row| row.get::<_, i64>(0) as u64))
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
            let row = Row::from_frame(seq, &frame).map_err(|err| {
                ArchiveError::Store(format!(
                    "stored event {session_id}/{seq} is not JSON: {err}"
                ))
            })?;
            rows.push(row);
        }
        Ok(rows)
    }
}

/// Formats an error followed by its sources. tokio-postgres keeps the
/// useful part there: the server's own message (`database "x" does not
/// exist`) or the cause of a failed connect (`Connection refused`).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Returns where archiving a session resumes: after `archived`, the seq
/// Postgres gives, but never inside the events the local store has trimmed,
/// which it cannot read. Postgres behind the trimmed seq means it lost
/// archived events, for example after a restore from an older backup. They
/// cannot be written again, so the gap is logged as an error and skipped.
fn skip_trimmed(session_id: &str, archived: u64, trimmed_through: u64) -> u64 {
    if archived < trimmed_through {
        error!(
            session_id,
            postgres_archived_seq = archived,
            trimmed_through,
            "the archive lacks events this node has already trimmed, so they cannot be archived again; \
             was the database restored from an older backup or DATABASE_URL changed?"
        );
    }
    archived.max(trimmed_through)
}

/// Returns a JSON text that Postgres accepts as `jsonb`: U+0000 in its
/// strings becomes U+FFFD.
fn clean_json_text(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("\\u0000") {
        return std::borrow::Cow::Borrowed(text);
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(mut value) => {
            rows::replace_nul(&mut value);
            std::borrow::Cow::Owned(value.to_string())
        }
        Err(_) => std::borrow::Cow::Borrowed(text),
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

    /// An error whose message, like tokio-postgres's, leaves the cause to
    /// its source.
    #[derive(Debug)]
    struct Connect(std::io::Error);

    impl std::fmt::Display for Connect {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("error connecting to server")
        }
    }

    impl std::error::Error for Connect {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_chain_shows_sources() {
        let connection_error =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        assert_eq!(
            error_chain(&Connect(connection_error)),
            "error connecting to server: Connection refused"
        );
        let plain = ArchiveError::Store("event 3 is missing".to_string());
        assert_eq!(error_chain(&plain), "local store: event 3 is missing");
    }

    #[test]
    fn transaction_limits_match_the_batch_timeout() {
        let millis = BATCH_TIMEOUT.as_millis().to_string();
        assert_eq!(TRANSACTION_LIMITS.matches(millis.as_str()).count(), 2);
    }

    #[test]
    fn backoff_doubles_up_to_sixteen_seconds() {
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
}
