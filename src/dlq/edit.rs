//! Correcting a dead letter before it is retried.
//!
//! - A **poison message**'s event can be replaced by a corrected one: it is checked as a new
//!   event would be (decoded, routed, its data against its type's schema) and kept beside
//!   the original bytes, which stay as they arrived; a retry or replay re-ingests the
//!   correction.
//! - A **failed delivery**'s data (the notification's, which only this delivery will use
//!   again: the others are done) and address (checked for its channel) are changed in place,
//!   while the delivery is FAILED and so sent by no one.
//!
//! Every correction is audited in `dlq_edits`: who (the credential's name), when, the value
//! before and after, and an RFC 6902 patch between them.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::admin::{self, AdminError, DeadLetterView};
use crate::{
    domain::{Channel, Domain, EmailAddress, PhoneNumber},
    ingest::Ingestor,
};

/// One correction of a dead letter.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = DeadLetterEdit)]
pub struct Edit {
    pub id: Uuid,
    /// `payload` (a poison message's event) or `delivery` (a failed delivery's data and
    /// address).
    pub target: String,
    pub edited_by: String,
    pub edited_at: DateTime<Utc>,
    pub before: Value,
    pub after: Value,
    /// RFC 6902 operations turning `before` into `after`.
    pub diff: Value,
}

/// What an operator corrects.
#[derive(Debug, Clone)]
pub enum Correction {
    /// A poison message's whole event.
    Payload(Value),
    /// A failed delivery's data and/or address.
    Delivery {
        data: Option<Map<String, Value>>,
        address: Option<String>,
    },
}

/// Why a correction was refused.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The correction does not fit this letter (a payload for a delivery's letter...).
    #[error("{0}")]
    Mismatch(String),
    /// The corrected value would fail again (a class such as `schema_violation`, and why).
    #[error("{message}")]
    Invalid { class: String, message: String },
    #[error(transparent)]
    Admin(#[from] AdminError),
}

impl From<anyhow::Error> for EditError {
    fn from(error: anyhow::Error) -> Self {
        EditError::Admin(AdminError::Internal(error))
    }
}

/// The corrections of a letter, oldest first.
pub async fn list(db: &PgPool, letter: Uuid) -> anyhow::Result<Vec<Edit>> {
    sqlx::query_as(
        "SELECT id, target, edited_by, edited_at, before, after, diff FROM dlq_edits \
         WHERE letter_id = $1 ORDER BY edited_at, id",
    )
    .bind(letter)
    .fetch_all(db)
    .await
    .context("Failed to read a dead letter's corrections")
}

/// Applies `correction` to a PENDING letter on behalf of `actor`; returns the letter with its
/// corrections.
pub async fn edit(
    ingestor: &Ingestor,
    id: Uuid,
    correction: Correction,
    actor: &str,
) -> Result<DeadLetterView, EditError> {
    let db = &ingestor.db;
    let letter = admin::get(db, id).await?;
    if letter.status != "PENDING" {
        return Err(AdminError::Conflict(format!(
            "dead letter {id} is {}: only a PENDING one can be corrected",
            letter.status
        ))
        .into());
    }
    match (correction, letter.delivery_id) {
        (Correction::Payload(event), None) => edit_payload(ingestor, &letter, event, actor).await?,
        (Correction::Delivery { data, address }, Some(delivery)) => {
            edit_delivery(ingestor, &letter, delivery, data, address, actor).await?
        }
        (Correction::Payload(_), Some(_)) => {
            return Err(EditError::Mismatch(format!(
                "dead letter {id} is a failed delivery: correct its data or address, not a payload"
            )));
        }
        (Correction::Delivery { .. }, None) => {
            return Err(EditError::Mismatch(format!(
                "dead letter {id} is a poison message: correct its payload (the whole event)"
            )));
        }
    }
    let mut letter = admin::get(db, id).await?;
    letter.edits = Some(list(db, id).await?);
    Ok(letter)
}

async fn edit_payload(
    ingestor: &Ingestor,
    letter: &DeadLetterView,
    event: Value,
    actor: &str,
) -> Result<(), EditError> {
    if letter
        .headers
        .get(crate::webhooks::sender::WEBHOOK_CALL_HEADER)
        .is_some()
    {
        return Err(EditError::Mismatch(format!(
            "dead letter {} is a webhook call: it is sent again as it was",
            letter.id
        )));
    }
    let domain: Domain = letter
        .domain
        .parse()
        .map_err(|e: String| EditError::Mismatch(e))?;
    let bytes = serde_json::to_vec(&event).context("Failed to encode the corrected event")?;
    ingestor
        .check(domain, &bytes)
        .map_err(|poison| EditError::Invalid {
            class: poison.class.as_str().to_owned(),
            message: poison.message,
        })?;
    // The value before, read under the row's lock in the same statement: the previous
    // correction (a concurrent one included), else the original.
    let mut tx = ingestor.db.begin().await.context("Failed to begin")?;
    let previous: Option<Vec<u8>> = sqlx::query_scalar(
        "UPDATE dlq_messages m SET edited_payload = $2 \
         FROM (SELECT id, COALESCE(edited_payload, payload) AS previous FROM dlq_messages \
               WHERE id = $1 AND status = 'PENDING' FOR UPDATE) old \
         WHERE m.id = old.id RETURNING old.previous",
    )
    .bind(letter.id)
    .bind(&bytes)
    .fetch_optional(&mut *tx)
    .await
    .context("Failed to store the corrected event")?;
    let Some(previous) = previous else {
        return Err(AdminError::Conflict(format!(
            "dead letter {} changed meanwhile; read it again",
            letter.id
        ))
        .into());
    };
    // As JSON when it is; JSONB holds no NUL, so a message dead-lettered for one (or one
    // that is not JSON) is audited as its text, escaped.
    let before = serde_json::from_slice(&previous)
        .ok()
        .filter(|v| !crate::ingest::decode::contains_nul(v))
        .unwrap_or_else(|| {
            Value::String(String::from_utf8_lossy(&previous).replace('\0', "\\u0000"))
        });
    audit(&mut tx, letter.id, "payload", actor, before, event).await?;
    tx.commit().await.context("Failed to commit a correction")?;
    Ok(())
}

async fn edit_delivery(
    ingestor: &Ingestor,
    letter: &DeadLetterView,
    delivery: Uuid,
    data: Option<Map<String, Value>>,
    address: Option<String>,
    actor: &str,
) -> Result<(), EditError> {
    if data.is_none() && address.is_none() {
        return Err(EditError::Mismatch(
            "nothing to correct: give data, address or both".to_owned(),
        ));
    }
    let mut tx = ingestor.db.begin().await.context("Failed to begin")?;
    // Locked, so that no retry re-queues it while it changes.
    let row: Option<(Uuid, Channel, Option<String>, String, Value, String)> = sqlx::query_as(
        "SELECT n.id, d.channel, d.address, n.event_type, n.data, d.status \
         FROM deliveries d JOIN notifications n ON n.id = d.notification_id \
         WHERE d.id = $1 FOR UPDATE OF d, n",
    )
    .bind(delivery)
    .fetch_optional(&mut *tx)
    .await
    .context("Failed to read the delivery")?;
    let Some((notification, channel, old_address, event_type, old_data, status)) = row else {
        return Err(AdminError::Conflict(format!("delivery {delivery} no longer exists")).into());
    };
    if status != "FAILED" {
        return Err(AdminError::Conflict(format!(
            "delivery {delivery} is {status}: only a FAILED one can be corrected"
        ))
        .into());
    }
    let address = address.map(|a| checked_address(channel, &a)).transpose()?;
    if let Some(data) = &data {
        if crate::ingest::decode::contains_nul(&Value::Object(data.clone())) {
            return Err(EditError::Invalid {
                class: "invalid_field".to_owned(),
                message: "data holds a NUL character, which cannot be stored".to_owned(),
            });
        }
        ingestor
            .schemas
            .check(&event_type, data)
            .map_err(|violation| EditError::Invalid {
                class: "schema_violation".to_owned(),
                message: violation.to_string(),
            })?;
    }
    if data.is_some() {
        // The data is the notification's: a sibling still to be sent would go out with the
        // correction too, unaudited.
        let busy: Option<String> = sqlx::query_scalar(
            "SELECT channel FROM deliveries WHERE notification_id = $1 AND id <> $2 \
               AND status IN ('PENDING', 'PROCESSING') LIMIT 1",
        )
        .bind(notification)
        .bind(delivery)
        .fetch_optional(&mut *tx)
        .await
        .context("Failed to read the notification's deliveries")?;
        if let Some(channel) = busy {
            return Err(AdminError::Conflict(format!(
                "the notification's {channel} delivery is still being sent with this data: \
                 correct the data once it is done"
            ))
            .into());
        }
    }
    let before = json!({ "data": old_data, "address": old_address });
    let after = json!({
        "data": data.clone().map(Value::Object).unwrap_or(old_data),
        "address": address.clone().or(old_address),
    });
    if let Some(data) = data {
        sqlx::query("UPDATE notifications SET data = $2 WHERE id = $1")
            .bind(notification)
            .bind(Value::Object(data))
            .execute(&mut *tx)
            .await
            .context("Failed to correct the data")?;
    }
    if let Some(address) = address {
        sqlx::query("UPDATE deliveries SET address = $2 WHERE id = $1")
            .bind(delivery)
            .bind(address)
            .execute(&mut *tx)
            .await
            .context("Failed to correct the address")?;
    }
    audit(&mut tx, letter.id, "delivery", actor, before, after).await?;
    tx.commit().await.context("Failed to commit a correction")?;
    Ok(())
}

/// An address for `channel`, checked as the user directory checks it.
fn checked_address(channel: Channel, raw: &str) -> Result<String, EditError> {
    let invalid = |message: String| EditError::Invalid {
        class: "invalid_address".to_owned(),
        message,
    };
    match channel {
        Channel::Email => EmailAddress::parse(raw)
            .map(|a| a.as_str().to_owned())
            .map_err(invalid),
        Channel::Sms | Channel::Kakaotalk => PhoneNumber::parse(raw)
            .map(|p| p.as_str().to_owned())
            .map_err(invalid),
        Channel::Push => {
            let token = raw.trim();
            if token.is_empty() || token.len() > 4096 || token.chars().any(char::is_control) {
                Err(invalid(
                    "a push token is 1 to 4096 characters without control characters".to_owned(),
                ))
            } else {
                Ok(token.to_owned())
            }
        }
        Channel::Slack | Channel::InApp => Err(EditError::Mismatch(format!(
            "the {channel} channel has no address to correct"
        ))),
    }
}

async fn audit(
    tx: &mut sqlx::PgConnection,
    letter: Uuid,
    target: &str,
    actor: &str,
    before: Value,
    after: Value,
) -> anyhow::Result<()> {
    let diff = serde_json::to_value(json_patch::diff(&before, &after))
        .context("Failed to encode a correction's diff")?;
    sqlx::query(
        "INSERT INTO dlq_edits (id, letter_id, target, edited_by, before, after, diff) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(Uuid::now_v7())
    .bind(letter)
    .bind(target)
    .bind(actor)
    .bind(before)
    .bind(after)
    .bind(diff)
    .execute(tx)
    .await
    .context("Failed to audit a correction")?;
    Ok(())
}
