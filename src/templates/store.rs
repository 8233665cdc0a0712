//! Template versions in PostgreSQL (migration 0007): every statement on `template_versions`,
//! `template_active`, `template_activations` and `template_revision` lives here.
//!
//! Every change of the version in effect bumps `template_revision` in its transaction.
//! Each instance polls that one row ([`watch`]) and reloads its [`Overlay`] when it moved;
//! the instance that made the change applies it at once ([`refresh`]). So a version reaches
//! every instance within the poll interval (HERALD_TEMPLATES_REFRESH_MS) plus one reload.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use super::{Overlay, Part, Templates, template_name};
use crate::domain::Locale;

/// Which template: an event type's folder (or `_adhoc`), a locale and a part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateKey {
    pub event_type: String,
    pub locale: Locale,
    pub part: Part,
}

impl TemplateKey {
    /// The template's name in the set: `{locale}/{EVENT_TYPE}/{file}`.
    pub fn name(&self) -> String {
        template_name(self.locale, &self.event_type, self.part)
    }
}

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Version {
    pub version: i32,
    pub source: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// The version in effect: `None` is the file.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Active {
    pub version: Option<i32>,
    pub activated_by: String,
    pub activated_at: DateTime<Utc>,
}

/// One activation, for audit. Version 0 is the file.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Activation {
    pub version: i32,
    pub activated_by: String,
    pub activated_at: DateTime<Utc>,
}

/// Every stored version of a template, newest first.
pub async fn versions(db: &PgPool, key: &TemplateKey) -> anyhow::Result<Vec<Version>> {
    sqlx::query_as(
        "SELECT version, source, created_by, created_at FROM template_versions \
         WHERE event_type = $1 AND locale = $2 AND part = $3 ORDER BY version DESC",
    )
    .bind(&key.event_type)
    .bind(key.locale.as_str())
    .bind(key.part.name())
    .fetch_all(db)
    .await
    .context("Failed to list template versions")
}

/// One stored version, if it exists.
pub async fn version(
    db: &PgPool,
    key: &TemplateKey,
    version: i32,
) -> anyhow::Result<Option<Version>> {
    sqlx::query_as(
        "SELECT version, source, created_by, created_at FROM template_versions \
         WHERE event_type = $1 AND locale = $2 AND part = $3 AND version = $4",
    )
    .bind(&key.event_type)
    .bind(key.locale.as_str())
    .bind(key.part.name())
    .bind(version)
    .fetch_optional(db)
    .await
    .context("Failed to read a template version")
}

/// The version in effect; `None` when no version was ever activated (the file is).
pub async fn active(db: &PgPool, key: &TemplateKey) -> anyhow::Result<Option<Active>> {
    sqlx::query_as(
        "SELECT version, activated_by, activated_at FROM template_active \
         WHERE event_type = $1 AND locale = $2 AND part = $3",
    )
    .bind(&key.event_type)
    .bind(key.locale.as_str())
    .bind(key.part.name())
    .fetch_optional(db)
    .await
    .context("Failed to read the template version in effect")
}

/// The latest activations of a template, newest first.
pub async fn activations(
    db: &PgPool,
    key: &TemplateKey,
    limit: i64,
) -> anyhow::Result<Vec<Activation>> {
    sqlx::query_as(
        "SELECT version, activated_by, activated_at FROM template_activations \
         WHERE event_type = $1 AND locale = $2 AND part = $3 ORDER BY id DESC LIMIT $4",
    )
    .bind(&key.event_type)
    .bind(key.locale.as_str())
    .bind(key.part.name())
    .bind(limit)
    .fetch_all(db)
    .await
    .context("Failed to list template activations")
}

/// Stores `source` as the template's next version and puts it in effect, in one
/// transaction. The caller has checked it ([`super::check::check_version`]).
pub async fn create(
    db: &PgPool,
    key: &TemplateKey,
    source: &str,
    created_by: &str,
) -> anyhow::Result<Version> {
    let mut tx = db.begin().await.context("Failed to begin a transaction")?;
    bump_revision(&mut tx).await?;
    let stored: Version = sqlx::query_as(
        "INSERT INTO template_versions (event_type, locale, part, version, source, created_by) \
         SELECT $1, $2, $3, COALESCE(max(version), 0) + 1, $4, $5 FROM template_versions \
         WHERE event_type = $1 AND locale = $2 AND part = $3 \
         RETURNING version, source, created_by, created_at",
    )
    .bind(&key.event_type)
    .bind(key.locale.as_str())
    .bind(key.part.name())
    .bind(source)
    .bind(created_by)
    .fetch_one(&mut *tx)
    .await
    .context("Failed to store a template version")?;
    set_active(&mut tx, key, Some(stored.version), created_by).await?;
    tx.commit()
        .await
        .context("Failed to commit a template version")?;
    tracing::info!(template = %key.name(), version = stored.version, created_by, "template version stored and activated");
    Ok(stored)
}

/// Puts a stored version (`Some`) or the file (`None`) in effect. False when there is no
/// such version.
pub async fn activate(
    db: &PgPool,
    key: &TemplateKey,
    version: Option<i32>,
    activated_by: &str,
) -> anyhow::Result<bool> {
    let mut tx = db.begin().await.context("Failed to begin a transaction")?;
    bump_revision(&mut tx).await?;
    if let Some(version) = version {
        let exists: Option<i32> = sqlx::query_scalar(
            "SELECT version FROM template_versions \
             WHERE event_type = $1 AND locale = $2 AND part = $3 AND version = $4",
        )
        .bind(&key.event_type)
        .bind(key.locale.as_str())
        .bind(key.part.name())
        .bind(version)
        .fetch_optional(&mut *tx)
        .await
        .context("Failed to read a template version")?;
        if exists.is_none() {
            return Ok(false);
        }
    }
    set_active(&mut tx, key, version, activated_by).await?;
    tx.commit()
        .await
        .context("Failed to commit a template activation")?;
    tracing::info!(template = %key.name(), version = version.unwrap_or(0), activated_by, "template version activated");
    Ok(true)
}

/// Takes the revision row's lock (so changes are serialised and the counter follows the
/// commit order) and bumps it.
async fn bump_revision(tx: &mut Transaction<'_, Postgres>) -> anyhow::Result<i64> {
    sqlx::query_scalar("UPDATE template_revision SET revision = revision + 1 RETURNING revision")
        .fetch_one(&mut **tx)
        .await
        .context("Failed to bump the template revision")
}

async fn set_active(
    tx: &mut Transaction<'_, Postgres>,
    key: &TemplateKey,
    version: Option<i32>,
    activated_by: &str,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO template_active (event_type, locale, part, version, activated_by) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (event_type, locale, part) DO UPDATE \
         SET version = EXCLUDED.version, activated_by = EXCLUDED.activated_by, \
             activated_at = now()",
    )
    .bind(&key.event_type)
    .bind(key.locale.as_str())
    .bind(key.part.name())
    .bind(version)
    .bind(activated_by)
    .execute(&mut **tx)
    .await
    .context("Failed to set the template version in effect")?;
    sqlx::query(
        "INSERT INTO template_activations (event_type, locale, part, version, activated_by) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&key.event_type)
    .bind(key.locale.as_str())
    .bind(key.part.name())
    .bind(version.unwrap_or(0))
    .bind(activated_by)
    .execute(&mut **tx)
    .await
    .context("Failed to record a template activation")?;
    Ok(())
}

/// The change counter: moves whenever the versions in effect change.
pub async fn revision(db: &PgPool) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT revision FROM template_revision")
        .fetch_one(db)
        .await
        .context("Failed to read the template revision")
}

/// The versions in effect, at least as new as `revision` (read first, so that a change
/// committed in between is at worst applied twice, never missed).
async fn overlay(db: &PgPool, revision: i64) -> anyhow::Result<Overlay> {
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT a.event_type, a.locale, a.part, v.source FROM template_active a \
         JOIN template_versions v USING (event_type, locale, part, version)",
    )
    .fetch_all(db)
    .await
    .context("Failed to read the template versions in effect")?;
    let mut sources = BTreeMap::new();
    for (event_type, locale, part, source) in rows {
        match (locale.parse::<Locale>(), Part::from_name(&part)) {
            (Ok(locale), Some(part)) => {
                sources.insert(template_name(locale, &event_type, part), source);
            }
            _ => tracing::error!(
                event_type,
                locale,
                part,
                "a stored template version names no known locale or part; skipped"
            ),
        }
    }
    Ok(Overlay { revision, sources })
}

/// Applies the versions in effect to `templates` if they changed since it last loaded
/// them. True when something was applied.
pub async fn refresh(db: &PgPool, templates: &Templates) -> anyhow::Result<bool> {
    let revision = revision(db).await?;
    if revision <= templates.overlay_revision() {
        return Ok(false);
    }
    templates.set_overlay(overlay(db, revision).await?);
    Ok(true)
}

/// Polls for changes every `every` until `shutdown`. A database failure keeps the set in
/// effect and is logged once, and its end once.
pub async fn watch(
    db: PgPool,
    templates: std::sync::Arc<Templates>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match refresh(&db, &templates).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("template versions are read again");
            }
            Ok(_) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::error!(
                    error = format!("{error:#}"),
                    "cannot read template versions; keeping the set in effect"
                );
            }
            Err(_) => {}
        }
    }
}
