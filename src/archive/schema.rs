//! The Postgres schema and its versioned migrations.
//!
//! Every start runs the migrations not yet applied, in one transaction that
//! holds an advisory lock, so several nodes starting at once apply each
//! migration exactly once and the others wait, then find it applied.

use tokio_postgres::Client;
use tracing::info;

/// Key of the advisory lock that serialises migrations across nodes.
const MIGRATION_LOCK: i64 = 0x5354_4152_4349_5445; // "STARCITE"

/// Migrations by version, applied in order. Never edit one that has shipped:
/// add a new version instead.
const MIGRATIONS: &[(i32, &str)] = &[
    (
    1,
    "CREATE TABLE sessions (
        id text PRIMARY KEY,
        title text,
        metadata jsonb NOT NULL,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        archived_seq bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE events (
        session_id text NOT NULL,
        seq bigint NOT NULL,
        type text NOT NULL,
        payload jsonb NOT NULL,
        actor text NOT NULL,
        source text,
        metadata jsonb NOT NULL,
        refs jsonb NOT NULL,
        idempotency_key text,
        inserted_at timestamptz NOT NULL,
        PRIMARY KEY (session_id, seq)
    );",
    ),
    (
        2,
        // Postgres cannot store U+0000 in text or jsonb. Events that contain
        // it are archived with U+FFFD in its place and their exact frame here.
        "ALTER TABLE events ADD COLUMN frame text;
        COMMENT ON COLUMN events.frame IS
            'Exact tail frame, set only when the event contains U+0000, which the other columns show as U+FFFD';",
    ),
];

/// Applies every migration the database lacks and returns the schema version.
pub async fn migrate(client: &mut Client) -> Result<i32, tokio_postgres::Error> {
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS starcite_schema_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;

    let row = transaction
        .query_one(
            "SELECT coalesce(max(version), 0) FROM starcite_schema_migrations",
            &[],
        )
        .await?;
    let mut version: i32 = row.get(0);
    for (target, sql) in MIGRATIONS {
        if *target <= version {
            continue;
        }
        transaction.batch_execute(sql).await?;
        transaction
            .execute(
                "INSERT INTO starcite_schema_migrations (version) VALUES ($1)",
                &[target],
            )
            .await?;
        info!(version = target, "archive schema migrated");
        version = *target;
    }
    transaction.commit().await?;
    Ok(version)
}
