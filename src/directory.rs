//! The user directory: how to reach each user (email, phone, locale, time zone). An event's
//! own recipient overrides it field by field.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::domain::{EmailAddress, Locale, PhoneNumber, Timezone, UserId};

/// One user's entry.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Contact {
    pub email: Option<EmailAddress>,
    pub phone: Option<PhoneNumber>,
    pub locale: Option<Locale>,
    pub timezone: Option<Timezone>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

type ContactRow = (
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    DateTime<Utc>,
);

fn from_row((_, email, phone, locale, timezone, updated_at): ContactRow) -> Contact {
    // Rows are written only through `upsert`, from parsed values; re-parsing cannot fail
    // unless someone edited the table by hand, and then the field is treated as absent.
    Contact {
        email: email.and_then(|e| EmailAddress::parse(&e).ok()),
        phone: phone.and_then(|p| PhoneNumber::parse(&p).ok()),
        locale: locale.and_then(|l| l.parse().ok()),
        timezone: timezone.and_then(|t| Timezone::parse(&t).ok()),
        updated_at: Some(updated_at),
    }
}

/// The entries of many users (absent users are absent from the map).
pub async fn load_many(db: &PgPool, users: &[UserId]) -> anyhow::Result<HashMap<UserId, Contact>> {
    if users.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i64> = users.iter().map(|u| u.get()).collect();
    let rows: Vec<ContactRow> = sqlx::query_as(
        "SELECT user_id, email, phone, locale, timezone, updated_at FROM user_contacts \
         WHERE user_id = ANY($1)",
    )
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
    let row: ContactRow = sqlx::query_as(
        "INSERT INTO user_contacts (user_id, email, phone, locale, timezone) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (user_id) DO UPDATE SET email = EXCLUDED.email, phone = EXCLUDED.phone, \
             locale = EXCLUDED.locale, timezone = EXCLUDED.timezone, updated_at = now() \
         RETURNING user_id, email, phone, locale, timezone, updated_at",
    )
    .bind(user.get())
    .bind(contact.email.as_ref().map(EmailAddress::as_str))
    .bind(contact.phone.as_ref().map(PhoneNumber::as_str))
    .bind(contact.locale.map(Locale::as_str))
    .bind(contact.timezone.as_ref().map(Timezone::as_str))
    .fetch_one(db)
    .await
    .context("Failed to store the user contact")?;
    Ok(from_row(row))
}
