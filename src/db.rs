//! The PostgreSQL pool and the embedded migrations of `migrations/`.

use std::time::Duration;

use anyhow::Context;
use sqlx::{PgPool, postgres::PgPoolOptions};

use crate::config::DatabaseSettings;

/// How long a caller waits for a pooled connection before the request fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Migrations compiled into the binary, so a deployed Herald needs no files to migrate.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool that connects on first use, so Herald starts (and reports itself not ready)
/// while PostgreSQL is down.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    use secrecy::ExposeSecret;
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
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
