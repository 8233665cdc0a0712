//! User channel preferences: per channel, optionally per event type, and quiet hours
//! ([`crate::timing::quiet_hours`]), stored in PostgreSQL and cached in Redis.
//!
//! The cache is read-through (readers fill only an empty entry) and written through on
//! every change, with a TTL. Redis is an
//! accelerator, never a dependency: when it is down or slow, reads go to PostgreSQL and
//! writes still succeed (the stale entry then expires within [`CACHE_TTL_SECS`]).

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use anyhow::Context;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::{
    domain::{Channel, EventType, UserId},
    timing::quiet_hours::QuietWindow,
};

/// How long a cached entry lives; bounds staleness if an invalidation is lost.
pub const CACHE_TTL_SECS: u64 = 300;
/// How long a cache call may take before PostgreSQL is asked instead.
const CACHE_TIMEOUT: Duration = Duration::from_millis(250);

/// One user's choices. A channel absent from both maps is on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Preferences {
    /// Per channel, for every event type.
    pub channels: BTreeMap<Channel, bool>,
    /// Per event type and channel; wins over `channels`.
    pub event_types: BTreeMap<EventType, BTreeMap<Channel, bool>>,
    /// The user's own quiet hours; `None`: the event types' defaults (the routing file);
    /// empty: none at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<Vec<QuietWindow>>,
}

impl Preferences {
    /// Whether the user wants `channel` for `event_type`.
    pub fn allows(&self, channel: Channel, event_type: &EventType) -> bool {
        self.event_types
            .get(event_type)
            .and_then(|channels| channels.get(&channel))
            .or_else(|| self.channels.get(&channel))
            .copied()
            .unwrap_or(true)
    }

    /// Sets a channel for every event type.
    pub fn set_channel(&mut self, channel: Channel, enabled: bool) {
        self.channels.insert(channel, enabled);
    }
}

fn cache_key(prefix: &str, user: UserId) -> String {
    // v2: entries carry quiet hours (a v1 entry would read as "none set").
    format!("{prefix}prefs:v2:{user}")
}

/// Loads the preferences of many users at once: one MGET, then one query for the misses.
pub async fn load_many(
    db: &PgPool,
    redis: &ConnectionManager,
    key_prefix: &str,
    users: &[UserId],
) -> anyhow::Result<HashMap<UserId, Preferences>> {
    let mut found = HashMap::new();
    if users.is_empty() {
        return Ok(found);
    }
    let keys: Vec<String> = users.iter().map(|u| cache_key(key_prefix, *u)).collect();
    let mut conn = redis.clone();
    let cached = tokio::time::timeout(
        CACHE_TIMEOUT,
        redis::cmd("MGET")
            .arg(&keys)
            .query_async::<Vec<Option<String>>>(&mut conn),
    )
    .await;
    let cache_up = match cached {
        Ok(Ok(values)) => {
            for (user, value) in users.iter().zip(values) {
                if let Some(prefs) = value.and_then(|v| serde_json::from_str(&v).ok()) {
                    found.insert(*user, prefs);
                }
            }
            metrics::counter!("herald_preference_cache_hits_total").increment(found.len() as u64);
            true
        }
        Ok(Err(error)) => {
            cache_unavailable(&error.to_string());
            false
        }
        Err(_) => {
            cache_unavailable("no answer in time");
            false
        }
    };

    let missing: Vec<UserId> = users
        .iter()
        .filter(|u| !found.contains_key(u))
        .copied()
        .collect();
    if missing.is_empty() {
        return Ok(found);
    }
    let from_db = load_from_db(db, &missing).await?;
    if cache_up {
        let mut pipe = redis::pipe();
        for user in &missing {
            let prefs = from_db.get(user).cloned().unwrap_or_default();
            // NX: a reader must never overwrite what a writer put there after this reader
            // looked at PostgreSQL (it would bring an opted-out channel back).
            pipe.cmd("SET")
                .arg(cache_key(key_prefix, *user))
                .arg(serde_json::to_string(&prefs)?)
                .arg("EX")
                .arg(CACHE_TTL_SECS)
                .arg("NX")
                .ignore();
        }
        let stored = tokio::time::timeout(CACHE_TIMEOUT, pipe.query_async::<()>(&mut conn)).await;
        if !matches!(stored, Ok(Ok(()))) {
            tracing::debug!("could not fill the preference cache");
        }
    }
    for user in missing {
        found.insert(user, from_db.get(&user).cloned().unwrap_or_default());
    }
    Ok(found)
}

/// Loads one user's preferences.
pub async fn load(
    db: &PgPool,
    redis: &ConnectionManager,
    key_prefix: &str,
    user: UserId,
) -> anyhow::Result<Preferences> {
    Ok(load_many(db, redis, key_prefix, &[user])
        .await?
        .remove(&user)
        .unwrap_or_default())
}

/// Replaces a user's preferences, then invalidates the cached copy.
pub async fn replace(
    db: &PgPool,
    redis: &ConnectionManager,
    key_prefix: &str,
    user: UserId,
    preferences: &Preferences,
) -> anyhow::Result<()> {
    let mut rows: Vec<(String, String, bool)> = preferences
        .channels
        .iter()
        .map(|(c, on)| (c.as_str().to_owned(), "*".to_owned(), *on))
        .collect();
    for (event_type, channels) in &preferences.event_types {
        for (channel, on) in channels {
            rows.push((channel.as_str().to_owned(), event_type.to_string(), *on));
        }
    }
    let (channels, event_types, enabled): (Vec<_>, Vec<_>, Vec<_>) =
        rows.into_iter()
            .fold((vec![], vec![], vec![]), |mut acc, (c, e, on)| {
                acc.0.push(c);
                acc.1.push(e);
                acc.2.push(on);
                acc
            });

    let mut tx = db.begin().await.context("Failed to begin a transaction")?;
    // Two PUTs for one user run one after the other instead of colliding on the key.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(user.get())
        .execute(&mut *tx)
        .await
        .context("Failed to lock the user's preferences")?;
    sqlx::query("DELETE FROM user_preferences WHERE user_id = $1")
        .bind(user.get())
        .execute(&mut *tx)
        .await
        .context("Failed to clear preferences")?;
    sqlx::query(
        "INSERT INTO user_preferences (user_id, channel, event_type, enabled) \
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::bool[])",
    )
    .bind(user.get())
    .bind(&channels)
    .bind(&event_types)
    .bind(&enabled)
    .execute(&mut *tx)
    .await
    .context("Failed to store preferences")?;
    match &preferences.quiet_hours {
        None => sqlx::query("DELETE FROM user_quiet_hours WHERE user_id = $1")
            .bind(user.get())
            .execute(&mut *tx)
            .await
            .context("Failed to clear quiet hours")?,
        Some(windows) => sqlx::query(
            "INSERT INTO user_quiet_hours (user_id, windows) VALUES ($1, $2) \
             ON CONFLICT (user_id) DO UPDATE SET windows = EXCLUDED.windows, updated_at = now()",
        )
        .bind(user.get())
        .bind(sqlx::types::Json(windows))
        .execute(&mut *tx)
        .await
        .context("Failed to store quiet hours")?,
    };
    tx.commit().await.context("Failed to commit preferences")?;

    // Write-through: the cache holds the new value at once (readers only fill an empty
    // entry, so none can put the old one back afterwards).
    let mut conn = redis.clone();
    let stored = tokio::time::timeout(
        CACHE_TIMEOUT,
        redis::cmd("SET")
            .arg(cache_key(key_prefix, user))
            .arg(serde_json::to_string(preferences)?)
            .arg("EX")
            .arg(CACHE_TTL_SECS)
            .query_async::<()>(&mut conn),
    )
    .await;
    if !matches!(stored, Ok(Ok(()))) {
        tracing::warn!(
            user = %user,
            "could not update cached preferences; the old copy expires within {CACHE_TTL_SECS} s"
        );
    }
    Ok(())
}

async fn load_from_db(
    db: &PgPool,
    users: &[UserId],
) -> anyhow::Result<HashMap<UserId, Preferences>> {
    let ids: Vec<i64> = users.iter().map(|u| u.get()).collect();
    let rows: Vec<(i64, String, String, bool)> = sqlx::query_as(
        "SELECT user_id, channel, event_type, enabled FROM user_preferences \
         WHERE user_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(db)
    .await
    .context("Failed to load preferences")?;
    let quiet: Vec<(i64, sqlx::types::Json<Vec<QuietWindow>>)> =
        sqlx::query_as("SELECT user_id, windows FROM user_quiet_hours WHERE user_id = ANY($1)")
            .bind(&ids)
            .fetch_all(db)
            .await
            .context("Failed to load quiet hours")?;
    let mut found: HashMap<UserId, Preferences> = HashMap::new();
    for (user, windows) in quiet {
        if let Ok(user) = UserId::new(user) {
            found.entry(user).or_default().quiet_hours = Some(windows.0);
        }
    }
    for (user, channel, event_type, enabled) in rows {
        // Rows are written only through `replace`, so they parse; a row that does not is
        // ignored rather than blocking every notification of that user.
        let (Ok(user), Ok(channel)) = (UserId::new(user), channel.parse::<Channel>()) else {
            continue;
        };
        let prefs = found.entry(user).or_default();
        if event_type == "*" {
            prefs.channels.insert(channel, enabled);
        } else if let Ok(event_type) = EventType::parse(&event_type) {
            prefs
                .event_types
                .entry(event_type)
                .or_default()
                .insert(channel, enabled);
        }
    }
    Ok(found)
}

fn cache_unavailable(reason: &str) {
    metrics::counter!("herald_preference_cache_errors_total").increment(1);
    tracing::warn!(%reason, "preference cache unavailable; reading PostgreSQL");
}
