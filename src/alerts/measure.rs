//! What the rules read, from PostgreSQL, so that the figures cover every instance.
//!
//! Sends are what dispatch records anyway: a failed or repeated attempt is a
//! `delivery_attempts` row, a first attempt that succeeded is the delivery's
//! `first_attempt_started_at`/`first_attempt_latency_ms` (migration 0009). Neither has an
//! index on its time, and none is added: an index on `first_attempt_started_at` would be
//! one more index entry written by every successful send, the very path issue 14 thins.
//! Delivery ids are UUIDv7 instead (as [`crate::retention`] uses them): the rules read the
//! sends of the deliveries *created* within two windows, a primary-key range on both
//! tables, and keep those that started within the window. A delivery created longer ago
//! than one extra window before its attempt (scheduled far ahead, or queued behind a long
//! backlog) is left out on both sides of the rate, so the rate is not skewed by it; the
//! pending-deliveries rule watches that backlog. Dead letters are counted the same way
//! (`dlq_messages` ids are v7). Pending deliveries are counted up to ten times the
//! threshold, so a huge backlog does not make the count itself slow; on a table whose
//! visibility map is current PostgreSQL reads them from the dispatcher's partial indexes
//! (`deliveries_due`, `_due_broadcast`, `_due_digest`), one branch each, as the
//! dispatcher's own queue sampler (`herald_delivery_queue_depth`, every 5 s) does; a
//! single `status = 'PENDING'` matches none of them and read the whole table. Measured on
//! 200,000 deliveries
//! (one every 0.9 s, so about 670 in the id range of a 5-minute window): 0.2 ms for the
//! sends, through both primary keys; 13 ms for the pending count.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::{Reading, Rule};
use crate::{config::AlertSettings, deliveries, retention::first_id_at};

/// Every rule's readings at `now`.
pub async fn all(
    conn: &mut PgConnection,
    s: &AlertSettings,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Reading>> {
    let mut readings = success_rates(conn, s, now).await?;
    readings.push(pending(conn, s).await?);
    readings.extend(send_p99(conn, s, now).await?);
    readings.extend(dead_letters(conn, s, now).await?);
    Ok(readings)
}

/// The sends of the window: attempts of deliveries created within two windows that
/// started within one. `$1` the smallest id, `$2` the window's start.
const SENDS: &str = "\
    SELECT channel, outcome, latency_ms FROM delivery_attempts \
    WHERE delivery_id >= $1 AND started_at >= $2 \
    UNION ALL \
    SELECT COALESCE(sent_via, channel), 'SUCCESS', first_attempt_latency_ms FROM deliveries \
    WHERE id >= $1 AND first_attempt_started_at >= $2";

fn bounds(now: DateTime<Utc>, window: Duration) -> (uuid::Uuid, DateTime<Utc>) {
    let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    let start = now - window;
    (first_id_at(start - window), start)
}

async fn success_rates(
    conn: &mut PgConnection,
    s: &AlertSettings,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Reading>> {
    let (first_id, start) = bounds(now, s.success_rate_window);
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT channel, count(*) FILTER (WHERE outcome = 'SUCCESS'), count(*) \
         FROM ({SENDS}) sends GROUP BY channel"
    )))
    .bind(first_id)
    .bind(start)
    .fetch_all(conn)
    .await
    .context("Failed to measure the success rates")?;
    // As the Prometheus rule: only while the channel sends often enough for a rate to mean
    // something (a quiet channel with one failure is not an incident).
    let enough = s.success_rate_min_sends_per_second * s.success_rate_window.as_secs_f64();
    Ok(rows
        .into_iter()
        .map(|(channel, succeeded, sends)| {
            let rate = succeeded as f64 / sends as f64;
            Reading {
                rule: Rule::ChannelSuccessRateLow,
                subject: channel,
                value: Some(rate),
                breached: sends as f64 > enough && rate < s.success_rate_min,
            }
        })
        .collect())
}

async fn send_p99(
    conn: &mut PgConnection,
    s: &AlertSettings,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Reading>> {
    let (first_id, start) = bounds(now, s.send_p99_window);
    let rows: Vec<(String, f64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT channel, percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) / 1000.0 \
         FROM ({SENDS}) sends GROUP BY channel"
    )))
    .bind(first_id)
    .bind(start)
    .fetch_all(conn)
    .await
    .context("Failed to measure the send times")?;
    let max = s.send_p99_max.as_secs_f64();
    Ok(rows
        .into_iter()
        .map(|(channel, p99)| Reading {
            rule: Rule::ProviderSlow,
            subject: channel,
            value: Some(p99),
            breached: p99 > max,
        })
        .collect())
}

async fn pending(conn: &mut PgConnection, s: &AlertSettings) -> anyhow::Result<Reading> {
    // Due ones only: a delivery held for later (quiet hours overnight, a digest's window,
    // scheduledAt) is no backlog.
    let pending =
        deliveries::count_due(conn, s.pending_max.saturating_mul(10).saturating_add(1)).await?;
    Ok(Reading {
        rule: Rule::PendingDeliveriesHigh,
        subject: String::new(),
        value: Some(pending as f64),
        breached: pending > s.pending_max,
    })
}

async fn dead_letters(
    conn: &mut PgConnection,
    s: &AlertSettings,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Reading>> {
    let window = chrono::Duration::from_std(s.dead_letters_window).unwrap_or(chrono::Duration::MAX);
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT domain, count(*) FROM dlq_messages WHERE id >= $1 GROUP BY domain")
            .bind(first_id_at(now - window))
            .fetch_all(conn)
            .await
            .context("Failed to count the recent dead letters")?;
    Ok(rows
        .into_iter()
        .map(|(domain, n)| Reading {
            rule: Rule::DeadLettersArriving,
            subject: domain,
            value: Some(n as f64),
            breached: n > s.dead_letters_max,
        })
        .collect())
}
