//! Cold reads: events that the local store has trimmed, read back from the
//! Postgres archive for tails that start below the local frontier.

use std::time::Duration;

use serde_json::value::RawValue;

use super::rows::{format_inserted_at, ArchivedFrame};

/// Rows fetched from the portal per round trip. A page stops early once its
/// frames reach the byte budget, so large events cost no more than a fetch
/// of extra rows.
const FETCH_ROWS: i32 = 128;

/// Maximum time one page may take, longer than the pool's wait for a
/// connection plus its connect timeout (5 s each). A page normally takes
/// milliseconds, so this ends only reads from a Postgres that stopped
/// responding, which then close the tail with an error instead of leaving
/// it waiting.
const PAGE_TIMEOUT: Duration = Duration::from_secs(15);

/// Selects archived events in seq order. The JSON columns come back as
/// text and go into the frame without being decoded into values.
const SELECT_EVENTS: &str =
    "SELECT seq, type, payload::text, actor, source, metadata::text, refs::text,
            idempotency_key, round(extract(epoch FROM inserted_at) * 1000000)::bigint, frame
     FROM events
     WHERE session_id = $1 AND seq > $2 AND seq <= $3
     ORDER BY seq";

/// Reads archived events. Cheap to clone: it shares the archive's pool.
#[derive(Clone)]
pub struct ColdReader {
    pool: deadpool_postgres::Pool,
}

/// Failure of a cold read.
#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    #[error("no connection to the Postgres archive available: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("reading the Postgres archive failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("reading the Postgres archive timed out after {0:?}")]
    TimedOut(Duration),
    #[error("archived event {seq} has a JSON column Postgres returned as invalid JSON: {reason}")]
    Json { seq: u64, reason: String },
}

/// Limits of one page of archived frames.
pub struct PageLimit {
    pub events: usize,
    /// Frame bytes; the page ends after the frame that reaches it, so it
    /// always contains at least one event.
    pub bytes: usize,
}

impl ColdReader {
    pub fn new(pool: deadpool_postgres::Pool) -> ColdReader {
        ColdReader { pool }
    }

    /// Returns the frames of the session's archived events with seq in
    /// `after + 1 ..= through`, in seq order, up to `limit`. The caller
    /// checks that the seqs continue without a gap.
    pub async fn read(
        &self,
        session_id: &str,
        after: u64,
        through: u64,
        limit: &PageLimit,
    ) -> Result<Vec<(u64, String)>, ColdError> {
        tokio::time::timeout(
            PAGE_TIMEOUT,
            self.read_page(session_id, after, through, limit),
        )
        .await
        .map_err(|_| ColdError::TimedOut(PAGE_TIMEOUT))?
    }

    async fn read_page(
        &self,
        session_id: &str,
        after: u64,
        through: u64,
        limit: &PageLimit,
    ) -> Result<Vec<(u64, String)>, ColdError> {
        let mut client = self.pool.get().await?;
        let statement = client.prepare_cached(SELECT_EVENTS).await?;
        // A portal lives inside a transaction; this one only reads.
        let transaction = client.build_transaction().read_only(true).start().await?;
        transaction.batch_execute(super::TRANSACTION_LIMITS).await?;
        let portal = transaction
            .bind(
                &statement,
                &[&session_id, &(after as i64), &(through as i64)],
            )
            .await?;

        let mut frames = Vec::new();
        let mut bytes = 0;
        loop {
            let rows = transaction.query_portal(&portal, FETCH_ROWS).await?;
            for row in &rows {
                let (seq, frame) = render(row)?;
                bytes += frame.len();
                frames.push((seq, frame));
                if frames.len() >= limit.events || bytes >= limit.bytes {
                    return Ok(frames);
                }
            }
            // A short fetch means the portal is exhausted.
            if rows.len() < FETCH_ROWS as usize {
                return Ok(frames);
            }
        }
    }
}

/// Renders one row of [`SELECT_EVENTS`] as a tail frame: the stored frame
/// when the row has one, otherwise the columns in frame order.
fn render(row: &tokio_postgres::Row) -> Result<(u64, String), ColdError> {
    let seq = row.get::<_, i64>(0) as u64;
    if let Some(frame) = row.get::<_, Option<String>>(9) {
        return Ok((seq, frame));
    }

    let json = |index: usize| -> Result<Box<RawValue>, ColdError> {
        RawValue::from_string(row.get::<_, String>(index)).map_err(|err| ColdError::Json {
            seq,
            reason: err.to_string(),
        })
    };
    let (payload, metadata, refs) = (json(2)?, json(5)?, json(6)?);
    let frame = ArchivedFrame {
        seq,
        kind: row.get(1),
        payload: &*payload,
        actor: row.get(3),
        source: row.get(4),
        metadata: &*metadata,
        refs: &*refs,
        idempotency_key: row.get(7),
        inserted_at: format_inserted_at(row.get(8)),
    };
    Ok((seq, frame.render()))
}
