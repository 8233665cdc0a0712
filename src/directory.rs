//! The user directory: how to reach each user (email, phone, locale, time zone) and what
//! broadcasts can target them by (birth year, tags). An event's own recipient overrides it
//! field by field.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::domain::{BirthYear, EmailAddress, Locale, PhoneNumber, Tag, Timezone, UserId};

/// One user's entry.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ContactEntry)]
pub struct Contact {
    pub email: Option<EmailAddress>,
    pub phone: Option<PhoneNumber>,
    pub locale: Option<Locale>,
    pub timezone: Option<Timezone>,
    pub birth_year: Option<BirthYear>,
    pub tags: Vec<Tag>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

impl Contact {
    /// The targeting attributes as stored in `user_contacts.attributes`.
    fn attributes(&self) -> Value {
        let mut tags: Vec<&str> = self.tags.iter().map(Tag::as_str).collect();
        tags.sort_unstable();
        tags.dedup();
        json!({ "birthYear": self.birth_year.map(BirthYear::get), "tags": tags })
    }
}

type ContactRow = (
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Value,
    DateTime<Utc>,
);

const COLUMNS: &str = "user_id, email, phone, locale, timezone, attributes, updated_at";

fn from_row((_, email, phone, locale, timezone, attributes, updated_at): ContactRow) -> Contact {
    // Rows are written only through `upsert`, from parsed values; re-parsing cannot fail
    // unless someone edited the table by hand, and then the field is treated as absent.
    Contact {
        email: email.and_then(|e| EmailAddress::parse(&e).ok()),
        phone: phone.and_then(|p| PhoneNumber::parse(&p).ok()),
        locale: locale.and_then(|l| l.parse().ok()),
        timezone: timezone.and_then(|t| Timezone::parse(&t).ok()),
        birth_year: attributes["birthYear"]
            .as_i64()
            .and_then(|y| BirthYear::new(y).ok()),
        tags: attributes["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| Tag::parse(t.as_str()?).ok())
            .collect(),
        updated_at: Some(updated_at),
    }
}

/// The entries of many users (absent users are absent from the map).
pub async fn load_many(db: &PgPool, users: &[UserId]) -> anyhow::Result<HashMap<UserId, Contact>> {
    if users.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i64> = users.iter().map(|u| u.get()).collect();
    let rows: Vec<ContactRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM user_contacts WHERE user_id = ANY($1)"
    )))
    .bind(&ids)
    .fetch_all(db)
    .await
    .context("Failed to load user contacts")?;
    Ok(rows
        .into_iter()
        .filter_map(|row| Some((UserId::new(row.0).ok()?, from_row(row))))
        .collect())
}

/// One user's entry, if any.
pub async fn load(db: &PgPool, user: UserId) -> anyhow::Result<Option<Contact>> {
    Ok(load_many(db, &[user]).await?.remove(&user))
}

/// Creates or replaces a user's entry and returns it as stored.
pub async fn upsert(db: &PgPool, user: UserId, contact: &Contact) -> anyhow::Result<Contact> {
    let mut conn = db.acquire().await.context("Failed to reach PostgreSQL")?;
    upsert_many(&mut conn, &[(user, contact.clone())]).await?;
    load(db, user)
        .await?
        .context("a user contact vanished right after it was stored")
}

/// Users written per statement by [`upsert_many`].
const UPSERT_CHUNK: usize = 5_000;

/// Creates or replaces many entries inside the caller's transaction (the bulk import). A
/// user listed twice keeps the last entry. Rows are written in user id order across all
/// chunks, so concurrent imports lock them in the same order and cannot deadlock.
pub async fn upsert_many(
    conn: &mut PgConnection,
    entries: &[(UserId, Contact)],
) -> anyhow::Result<()> {
    let mut last: HashMap<UserId, &Contact> = HashMap::new();
    for (user, contact) in entries {
        last.insert(*user, contact);
    }
    let mut users: Vec<(UserId, &Contact)> = last.into_iter().collect();
    users.sort_by_key(|(user, _)| user.get());
    for chunk in users.chunks(UPSERT_CHUNK) {
        upsert_chunk(conn, chunk).await?;
    }
    Ok(())
}

async fn upsert_chunk(conn: &mut PgConnection, users: &[(UserId, &Contact)]) -> anyhow::Result<()> {
    let ids: Vec<i64> = users.iter().map(|(u, _)| u.get()).collect();
    let emails: Vec<Option<&str>> = users
        .iter()
        .map(|(_, c)| c.email.as_ref().map(EmailAddress::as_str))
        .collect();
    let phones: Vec<Option<&str>> = users
        .iter()
        .map(|(_, c)| c.phone.as_ref().map(PhoneNumber::as_str))
        .collect();
    let locales: Vec<Option<&str>> = users
        .iter()
        .map(|(_, c)| c.locale.map(Locale::as_str))
        .collect();
    let timezones: Vec<Option<&str>> = users
        .iter()
        .map(|(_, c)| c.timezone.as_ref().map(Timezone::as_str))
        .collect();
    let attributes: Vec<String> = users
        .iter()
        .map(|(_, c)| c.attributes().to_string())
        .collect();
    sqlx::query(
        "INSERT INTO user_contacts (user_id, email, phone, locale, timezone, attributes) \
         SELECT user_id, email, phone, locale, timezone, attributes::jsonb \
         FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
             AS t(user_id, email, phone, locale, timezone, attributes) \
         ON CONFLICT (user_id) DO UPDATE SET email = EXCLUDED.email, phone = EXCLUDED.phone, \
             locale = EXCLUDED.locale, timezone = EXCLUDED.timezone, \
             attributes = EXCLUDED.attributes, updated_at = now()",
    )
    .bind(&ids)
    .bind(&emails)
    .bind(&phones)
    .bind(&locales)
    .bind(&timezones)
    .bind(&attributes)
    .execute(conn)
    .await
    .context("Failed to store user contacts")?;
    Ok(())
}
