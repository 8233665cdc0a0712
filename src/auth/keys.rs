//! API keys: made, listed and revoked here (by `herald keys` and `/api/v1/admin/keys`), and
//! checked through [`KeyCache`].
//!
//! A key is `hrk_` and 64 hex digits (256 random bits). Only its SHA-256 digest is stored:
//! a stolen database does not yield working keys, and with that much entropy a slow hash
//! would add cost without adding safety.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{AuthFailure, Principal, Scope, Unavailable, digest};

/// Every key starts with this, so a key is recognisable (and secret scanners can find one
/// pasted where it should not be).
pub const KEY_PREFIX: &str = "hrk_";
/// How long a checked key's answer is reused. A revocation reaches every instance within
/// this (the contract says 5 s); a hit costs a digest and a map lookup.
pub const CACHE_TTL: Duration = Duration::from_secs(2);
/// The cache is emptied when it grows past this, which bounds what a caller spraying
/// random keys can make it hold.
const CACHE_MAX_ENTRIES: usize = 10_000;
/// `last_used_at` is written at most this often per key and instance.
const LAST_USED_EVERY: chrono::TimeDelta = chrono::TimeDelta::minutes(1);
/// How many characters of a key its listing shows.
const SHOWN_PREFIX_CHARS: usize = KEY_PREFIX.len() + 8;

/// A stored key, as the API shows it (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    pub id: Uuid,
    pub name: String,
    pub scopes: Vec<Scope>,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    name: String,
    scopes: Vec<String>,
    key_prefix: String,
    created_by: String,
    created_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    revoked_by: Option<String>,
}

const COLUMNS: &str = "id, name, scopes, key_prefix, created_by, created_at, last_used_at, \
                       revoked_at, revoked_by";

impl TryFrom<Row> for ApiKey {
    type Error = anyhow::Error;

    fn try_from(row: Row) -> anyhow::Result<Self> {
        let scopes = row
            .scopes
            .iter()
            .map(|s| s.parse::<Scope>().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| {
                format!("API key {} holds a scope this Herald does not know", row.id)
            })?;
        Ok(ApiKey {
            id: row.id,
            name: row.name,
            scopes,
            prefix: row.key_prefix,
            created_by: row.created_by,
            created_at: row.created_at,
            last_used_at: row.last_used_at,
            revoked_at: row.revoked_at,
            revoked_by: row.revoked_by,
        })
    }
}

/// A key just made: the only time the key itself exists outside its holder.
#[derive(Debug)]
pub struct CreatedKey {
    pub key: ApiKey,
    pub secret: String,
}

/// Checks a key's name and scopes as a person typed them; the message names the problem.
pub fn parse_request(name: &str, scopes: &[String]) -> Result<(String, Vec<Scope>), String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err("name must be 1 to 100 characters".to_owned());
    }
    if scopes.is_empty() {
        return Err("scopes must name at least one scope".to_owned());
    }
    let mut parsed = scopes
        .iter()
        .map(|s| s.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()?;
    parsed.sort();
    parsed.dedup();
    Ok((name.to_owned(), parsed))
}

/// Makes and stores a key.
pub async fn create(
    db: &PgPool,
    name: &str,
    scopes: &[Scope],
    created_by: &str,
) -> anyhow::Result<CreatedKey> {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let secret = format!(
        "{KEY_PREFIX}{}",
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let scope_names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    let row: Row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO api_keys (id, name, scopes, key_hash, key_prefix, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(&scope_names)
    .bind(digest(&secret).as_slice())
    .bind(&secret[..SHOWN_PREFIX_CHARS])
    .bind(created_by)
    .fetch_one(db)
    .await
    .context("Failed to store an API key")?;
    let key = ApiKey::try_from(row)?;
    tracing::info!(key_id = %key.id, name = %key.name, created_by, "API key created");
    Ok(CreatedKey { key, secret })
}

/// Every key, newest first, revoked ones included.
pub async fn list(db: &PgPool) -> anyhow::Result<Vec<ApiKey>> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM api_keys ORDER BY created_at DESC, id DESC"
    )))
    .fetch_all(db)
    .await
    .context("Failed to list API keys")?;
    rows.into_iter().map(ApiKey::try_from).collect()
}

/// Revokes a key; `None` when there is no such key. Revoking a revoked key changes nothing.
pub async fn revoke(db: &PgPool, id: Uuid, revoked_by: &str) -> anyhow::Result<Option<ApiKey>> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()), \
             revoked_by = COALESCE(revoked_by, $2) \
         WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(revoked_by)
    .fetch_optional(db)
    .await
    .context("Failed to revoke an API key")?;
    let key = row.map(ApiKey::try_from).transpose()?;
    if let Some(key) = &key {
        tracing::info!(key_id = %key.id, name = %key.name, revoked_by, "API key revoked");
    }
    Ok(key)
}

/// Recently checked keys by digest, with what the database said about them (`None`: no
/// such key). Shared by every request of an instance.
#[derive(Clone)]
pub struct KeyCache {
    db: PgPool,
    entries: Arc<Mutex<HashMap<[u8; 32], Cached>>>,
}

#[derive(Clone)]
struct Cached {
    checked: Instant,
    key: Option<Arc<ApiKey>>,
}

impl KeyCache {
    /// An empty cache over `db`'s keys.
    pub fn new(db: PgPool) -> Self {
        KeyCache {
            db,
            entries: Arc::default(),
        }
    }

    /// Who the key with this digest is, from the cache when its answer is fresh.
    pub async fn check(
        &self,
        digest: [u8; 32],
    ) -> Result<Result<Principal, AuthFailure>, Unavailable> {
        let cached = self
            .lock()
            .get(&digest)
            .filter(|c| c.checked.elapsed() < CACHE_TTL)
            .cloned();
        let key = match cached {
            Some(cached) => cached.key,
            None => {
                let key = self.fetch(digest).await.map_err(Unavailable)?;
                let mut entries = self.lock();
                if entries.len() >= CACHE_MAX_ENTRIES {
                    entries.clear();
                }
                entries.insert(
                    digest,
                    Cached {
                        checked: Instant::now(),
                        key: key.clone(),
                    },
                );
                key
            }
        };
        Ok(match key {
            None => Err(AuthFailure::UnknownKey),
            Some(key) if key.revoked_at.is_some() => Err(AuthFailure::Revoked),
            Some(key) => Ok(Principal::Key(key)),
        })
    }

    /// Forgets every cached answer about key `id` (after it was revoked here).
    pub fn forget(&self, id: Uuid) {
        self.lock()
            .retain(|_, cached| cached.key.as_ref().is_none_or(|k| k.id != id));
    }

    async fn fetch(&self, digest: [u8; 32]) -> anyhow::Result<Option<Arc<ApiKey>>> {
        let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_keys WHERE key_hash = $1"
        )))
        .bind(digest.as_slice())
        .fetch_optional(&self.db)
        .await
        .context("Failed to read an API key")?;
        let Some(key) = row.map(ApiKey::try_from).transpose()? else {
            return Ok(None);
        };
        let stale = key
            .last_used_at
            .is_none_or(|at| Utc::now() - at > LAST_USED_EVERY);
        if key.revoked_at.is_none() && stale {
            // Off the request's path: the answer does not wait for this write.
            let db = self.db.clone();
            let id = key.id;
            tokio::spawn(async move {
                let written = sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = $1")
                    .bind(id)
                    .execute(&db)
                    .await;
                if let Err(error) = written {
                    tracing::debug!(%error, key_id = %id, "cannot record a key's last use");
                }
            });
        }
        Ok(Some(Arc::new(key)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Cached>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_names_known_scopes_once_each() {
        let (name, scopes) = parse_request(
            " billing ",
            &[
                "notifications:write".into(),
                "dashboard:read".into(),
                "notifications:write".into(),
            ],
        )
        .unwrap();
        assert_eq!(name, "billing");
        assert_eq!(
            scopes,
            vec![Scope::NotificationsWrite, Scope::DashboardRead]
        );
    }

    #[test]
    fn a_request_with_an_unknown_scope_or_none_is_refused_with_the_reason() {
        let unknown = parse_request("x", &["notifications:delete".into()]).unwrap_err();
        assert!(unknown.contains("notifications:delete"), "{unknown}");
        assert!(unknown.contains("dlq:admin"), "{unknown}");
        assert!(
            parse_request("x", &[])
                .unwrap_err()
                .contains("at least one")
        );
        assert!(parse_request("  ", &["dlq:admin".into()]).is_err());
    }
}
