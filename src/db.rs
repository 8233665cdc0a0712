//! The PostgreSQL pool and the embedded migrations of `migrations/`.

use std::time::Duration;

use anyhow::Context;
use sqlx::{PgPool, postgres::PgPoolOptions};

use crate::config::DatabaseSettings;

/// How long a caller waits for a pooled connection before the request fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Migrations compiled into the binary, so a deployed Herald needs no files to migrate.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The workers' pool (`max_connections`), connecting on first use, so Herald starts (and
/// reports itself not ready) while PostgreSQL is down.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    pool_of(settings, settings.max_connections)
}

/// The API's pool (`api_max_connections`), apart from the workers' so that a flood of
/// requests cannot starve dispatch of the connections it records sends with.
pub fn api_pool(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    pool_of(settings, settings.api_max_connections)
}

/// A pooled connection idle for longer than this is pinged before it is handed out.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

fn pool_of(settings: &DatabaseSettings, max_connections: u32) -> anyhow::Result<PgPool> {
    use secrecy::ExposeSecret;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // sqlx pings every connection it hands out by default: a round trip before every
        // statement run on the pool, which under load waits for a core on both sides. A
        // connection back in the pool within the last second was working then; one idle
        // for longer (after a quiet spell, or while PostgreSQL restarted) is still checked,
        // and dropped for a new one if the server has gone.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_WHEN_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy(settings.url.expose_secret())
        .context("Failed to configure the PostgreSQL pool")
}

/// Applies every migration not applied yet. Safe to run again, and from several instances
/// at once (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context(
        "Failed to apply database migrations (is PostgreSQL up and HERALD_DATABASE_URL right?)",
    )
}

/// A statement with its parameters bound so far: statements built from parts (see
/// [`crate::intake::insert_rows`]) bind each part's columns with a function taking and
/// returning one.
pub type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Takes a transaction-level advisory lock on each of `ids`, keyed by its 64-bit hash with
/// `seed`, one after another in id order, so that two transactions locking overlapping
/// ids cannot deadlock. The locks are held until `conn`'s transaction ends.
pub async fn lock_ids_in_order(
    conn: &mut sqlx::PgConnection,
    ids: &[uuid::Uuid],
    seed: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT count(pg_advisory_xact_lock(hashtextextended(id::text, $2))) \
         FROM (SELECT id FROM UNNEST($1::uuid[]) AS id ORDER BY id) ordered",
    )
    .bind(ids)
    .bind(seed)
    .execute(conn)
    .await
    .map(drop)
}

/// True when PostgreSQL refused the data itself: SQLSTATE class 22 (data exception, such as
/// a bad encoding) or 23 (integrity constraint). Anything else (unreachable, shutting down,
/// refusing connections) is the infrastructure's fault and is retried.
pub fn is_data_error(error: &anyhow::Error) -> bool {
    sqlstate_class(error, &["22", "23"])
}

/// True when the transaction lost a race and may simply be run again: SQLSTATE class 40
/// (a deadlock or a serialization failure).
pub fn is_lost_race(error: &anyhow::Error) -> bool {
    sqlstate_class(error, &["40"])
}

/// True when PostgreSQL answered the statement with an error, so that it had no effect (as
/// opposed to a connection that failed, after which nobody knows).
pub fn is_refusal(error: &anyhow::Error) -> bool {
    database_errors(error).next().is_some()
}

fn sqlstate_class(error: &anyhow::Error, classes: &[&str]) -> bool {
    database_errors(error).any(|db| {
        db.code()
            .is_some_and(|code| classes.iter().any(|class| code.starts_with(class)))
    })
}

/// PostgreSQL's own errors among `error`'s causes.
fn database_errors(
    error: &anyhow::Error,
) -> impl Iterator<Item = &(dyn sqlx::error::DatabaseError + 'static)> {
    error
        .chain()
        .filter_map(|cause| match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => Some(&**db),
            _ => None,
        })
}
