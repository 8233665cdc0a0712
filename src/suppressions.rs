//! Addresses a channel must not send to again (issue 15): a hard bounce, or an
//! undeliverable receipt the provider calls permanent, suppresses that address on that
//! channel. Later deliveries to it are SKIPPED with the reason `suppressed` when a
//! dispatcher claims them (so a suppression made after a notification was stored still
//! applies), until an operator lifts it. Lifted suppressions are kept for audit, with who
//! lifted them.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::Channel;

/// The skip reason of a delivery to a suppressed address.
pub const SKIP_REASON: &str = "suppressed";

/// One suppression, as the admin API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Suppression {
    pub id: Uuid,
    pub channel: Channel,
    pub address: String,
    pub reason: String,
    /// The delivery whose receipt suppressed the address.
    pub delivery_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub lifted_at: Option<DateTime<Utc>>,
    /// The name of the credential that lifted it.
    pub lifted_by: Option<String>,
}

/// Suppresses `address` on `channel`; false when it already was.
pub async fn add(
    conn: &mut PgConnection,
    channel: Channel,
    address: &str,
    reason: &str,
    delivery_id: Uuid,
) -> anyhow::Result<bool> {
    let added = sqlx::query(
        "INSERT INTO suppressions (id, channel, address, reason, delivery_id) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (channel, address) WHERE lifted_at IS NULL DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(channel)
    .bind(address)
    .bind(reason)
    .bind(delivery_id)
    .execute(conn)
    .await
    .context("Failed to suppress an address")?
    .rows_affected();
    Ok(added == 1)
}

/// What the list shows.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub channel: Option<Channel>,
    pub address: Option<String>,
    /// Lifted ones too.
    pub include_lifted: bool,
    /// Only those created before this id (the cursor: ids are UUIDv7, so time-ordered).
    pub before: Option<Uuid>,
    pub limit: i64,
}

/// Suppressions, newest first.
pub async fn list(db: &PgPool, filter: &Filter) -> anyhow::Result<Vec<Suppression>> {
    sqlx::query_as(
        "SELECT id, channel, address, reason, delivery_id, created_at, lifted_at, lifted_by \
         FROM suppressions \
         WHERE ($1::text IS NULL OR channel = $1) AND ($2::text IS NULL OR address = $2) \
           AND ($3 OR lifted_at IS NULL) AND ($4::uuid IS NULL OR id < $4) \
         ORDER BY id DESC LIMIT $5",
    )
    .bind(filter.channel)
    .bind(&filter.address)
    .bind(filter.include_lifted)
    .bind(filter.before)
    .bind(filter.limit)
    .fetch_all(db)
    .await
    .context("Failed to list suppressions")
}

/// Lifts a suppression, recording who did; `None` when there is no such active one.
pub async fn lift(db: &PgPool, id: Uuid, by: &str) -> anyhow::Result<Option<Suppression>> {
    sqlx::query_as(
        "UPDATE suppressions SET lifted_at = now(), lifted_by = $2 \
         WHERE id = $1 AND lifted_at IS NULL \
         RETURNING id, channel, address, reason, delivery_id, created_at, lifted_at, lifted_by",
    )
    .bind(id)
    .bind(by)
    .fetch_optional(db)
    .await
    .context("Failed to lift a suppression")
}
