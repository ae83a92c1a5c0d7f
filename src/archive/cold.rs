//! Cold reads: events that the local store has trimmed, read back from the
//! Postgres archive for tails that start below the local frontier.

use serde_json::Value;

use super::rows::{format_inserted_at, ArchivedFrame};

/// Reads archived events. Cheap to clone: it shares the archive's pool.
#[derive(Clone)]
pub struct ColdReader {
    pool: deadpool_postgres::Pool,
}

/// Failure of a cold read.
#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    #[error("the Postgres archive is unreachable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("reading the Postgres archive failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl ColdReader {
    pub fn new(pool: deadpool_postgres::Pool) -> ColdReader {
        ColdReader { pool }
    }

    /// Returns the frames of the session's archived events with seq in
    /// `after + 1 ..= through`, at most `limit` of them, in seq order. The
    /// caller checks that the seqs continue without a gap.
    pub async fn read(
        &self,
        session_id: &str,
        after: u64,
        through: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, ColdError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT seq, type, payload, actor, source, metadata, refs, idempotency_key,
                        round(extract(epoch FROM inserted_at) * 1000000)::bigint, frame
                 FROM events
                 WHERE session_id = $1 AND seq > $2 AND seq <= $3
                 ORDER BY seq
                 LIMIT $4",
                &[
                    &session_id,
                    &(after as i64),
                    &(through as i64),
                    &(limit as i64),
                ],
            )
            .await?;

        let mut frames = Vec::with_capacity(rows.len());
        for row in rows {
            let seq = row.get::<_, i64>(0) as u64;
            if let Some(frame) = row.get::<_, Option<String>>(9) {
                frames.push((seq, frame));
                continue;
            }
            let payload: Value = row.get(2);
            let metadata: Value = row.get(5);
            let refs: Value = row.get(6);
            let frame = ArchivedFrame {
                seq,
                kind: row.get(1),
                payload: &payload,
                actor: row.get(3),
                source: row.get(4),
                metadata: &metadata,
                refs: &refs,
                idempotency_key: row.get(7),
                inserted_at: format_inserted_at(row.get(8)),
            };
            frames.push((seq, frame.render()));
        }
        Ok(frames)
    }
}
