//! Digests: an event type's events for one user (and, optionally, one value of a data
//! field) gathered for a window, then sent as one message per channel listing them
//! (issue 18).
//!
//! **How.** The first event of a user opens a digest (a `digests` row) whose window closes
//! `window_minutes` later; later events join it while it is open. Each event is stored as
//! usual, with its own notification and deliveries, so history shows every one; its
//! deliveries are PENDING, held for `digest` until the window closes, and carry the
//! digest's id. When they are due, the dispatcher claims every due delivery of the digest
//! on a channel at once, under a lock on the digest row that also closes it
//! ([`crate::deliveries::claim`]); it sends one message rendered from all of them and
//! records every one's outcome in one transaction.
//!
//! **Exactly one message.** Joining and closing take the same row lock, so an event
//! either joins before the close (and is in the message) or opens the next digest. The
//! members are rows in PostgreSQL from the moment their event is accepted, so a crash in
//! the middle of a window loses nothing and sends nothing early: whichever instance runs
//! when the window closes claims them all. Only a crash after the send and before its
//! record sends the message again, as for any delivery (at least once; the message carries
//! the first member's delivery id for receivers that deduplicate).

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{EventType, UserId};

/// How an event type is digested (`digest = { ... }` on its route).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigestRule {
    /// How long a digest gathers events after its first one.
    pub window_minutes: u32,
    /// A top-level `data` field whose value splits a user's events into digests of their
    /// own (e.g. `merchantId`); absent, one digest per user.
    #[serde(default)]
    pub key: Option<String>,
}

impl DigestRule {
    /// Checks what serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=7 * 24 * 60).contains(&self.window_minutes),
            "window_minutes must be 1 to 10080 (a week)"
        );
        Ok(())
    }

    /// The digest an event's data puts it in, among its user's digests of the type: the
    /// key field's value as text (`""` without a key or the field).
    pub fn key_of(&self, data: &Map<String, Value>) -> String {
        match self.key.as_ref().and_then(|k| data.get(k)) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        }
    }
}

/// One notification asking to join a digest.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub notification_id: Uuid,
    pub user_id: UserId,
    pub event_type: EventType,
    pub key: String,
    pub window_minutes: u32,
}

/// The digest a notification joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    pub digest_id: Uuid,
    /// When its window closes: the members' due time.
    pub closes_at: DateTime<Utc>,
}

/// Puts each notification in its user's open digest, opening one where there is none.
/// Runs in the transaction that stores the notifications, before their deliveries.
pub async fn join(
    conn: &mut PgConnection,
    requests: &[JoinRequest],
) -> anyhow::Result<HashMap<Uuid, Joined>> {
    if requests.is_empty() {
        return Ok(HashMap::new());
    }
    // One row per digest, in a fixed order: two transactions joining the same digests
    // lock them in the same order and cannot deadlock.
    let mut digests: BTreeMap<(i64, &str, &str), u32> = BTreeMap::new();
    for r in requests {
        digests.insert(
            (r.user_id.get(), r.event_type.as_str(), r.key.as_str()),
            r.window_minutes,
        );
    }
    let users: Vec<i64> = digests.keys().map(|k| k.0).collect();
    let types: Vec<&str> = digests.keys().map(|k| k.1).collect();
    let keys: Vec<&str> = digests.keys().map(|k| k.2).collect();
    let windows: Vec<i32> = digests.values().map(|w| *w as i32).collect();
    let ids: Vec<Uuid> = digests.keys().map(|_| Uuid::now_v7()).collect();
    // The open digests that exist are locked first, in key order: the close below and the
    // join after it then only take locks this transaction holds or rows it inserts (in
    // the same order), so two transactions joining one user's digests cannot deadlock.
    sqlx::query(
        "SELECT g.id FROM digests g \
         JOIN UNNEST($1::int8[], $2::text[], $3::text[]) AS t(user_id, event_type, digest_key) \
             ON g.user_id = t.user_id AND g.event_type = t.event_type \
                 AND g.digest_key = t.digest_key \
         WHERE g.closed_at IS NULL \
         ORDER BY g.user_id, g.event_type, g.digest_key FOR UPDATE OF g",
    )
    .bind(&users)
    .bind(&types)
    .bind(&keys)
    .execute(&mut *conn)
    .await
    .context("Failed to lock open digests")?;
    // A digest whose window has passed but which no dispatcher closed yet (its deliveries
    // all skipped, or the dispatchers are behind) takes no new members: it is closed here,
    // under the same lock a dispatcher's claim takes, and its due members still go out.
    sqlx::query(
        "UPDATE digests g SET closed_at = now() \
         FROM UNNEST($1::int8[], $2::text[], $3::text[]) AS t(user_id, event_type, digest_key) \
         WHERE g.user_id = t.user_id AND g.event_type = t.event_type \
             AND g.digest_key = t.digest_key AND g.closed_at IS NULL AND g.closes_at <= now()",
    )
    .bind(&users)
    .bind(&types)
    .bind(&keys)
    .execute(&mut *conn)
    .await
    .context("Failed to close past digests")?;
    let rows: Vec<(Uuid, i64, String, String, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO digests (id, user_id, event_type, digest_key, opened_at, closes_at) \
         SELECT id, user_id, event_type, digest_key, now(), \
             now() + window_minutes * interval '1 minute' \
         FROM UNNEST($1::uuid[], $2::int8[], $3::text[], $4::text[], $5::int4[]) \
             AS t(id, user_id, event_type, digest_key, window_minutes) \
         ON CONFLICT (user_id, event_type, digest_key) WHERE closed_at IS NULL \
         DO UPDATE SET last_joined_at = now() \
         RETURNING id, user_id, event_type, digest_key, closes_at",
    )
    .bind(&ids)
    .bind(&users)
    .bind(&types)
    .bind(&keys)
    .bind(&windows)
    .fetch_all(&mut *conn)
    .await
    .context("Failed to join digests")?;
    let found: HashMap<(i64, String, String), Joined> = rows
        .into_iter()
        .map(|(digest_id, user, event_type, key, closes_at)| {
            (
                (user, event_type, key),
                Joined {
                    digest_id,
                    closes_at,
                },
            )
        })
        .collect();
    let mut joined = HashMap::new();
    for r in requests {
        let key = (r.user_id.get(), r.event_type.to_string(), r.key.clone());
        let digest = found
            .get(&key)
            .copied()
            .context("a digest joined returned no row")?;
        joined.insert(r.notification_id, digest);
    }
    metrics::counter!("herald_digest_joins_total").increment(requests.len() as u64);
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_key_field_splits_a_users_digests_and_its_absence_makes_one() {
        let by_merchant = DigestRule {
            window_minutes: 10,
            key: Some("merchantId".to_owned()),
        };
        let data = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            by_merchant.key_of(&data(json!({ "merchantId": "m-1" }))),
            "m-1"
        );
        assert_eq!(by_merchant.key_of(&data(json!({ "merchantId": 7 }))), "7");
        assert_eq!(by_merchant.key_of(&data(json!({ "merchantId": null }))), "");
        assert_eq!(by_merchant.key_of(&data(json!({}))), "");
        let per_user = DigestRule {
            window_minutes: 10,
            key: None,
        };
        assert_eq!(per_user.key_of(&data(json!({ "merchantId": "m-1" }))), "");
        assert!(per_user.validate().is_ok());
        assert!(
            DigestRule {
                window_minutes: 0,
                key: None
            }
            .validate()
            .is_err()
        );
    }
}
