//! Provider receipts (issue 15): what became of a message after its provider accepted it.
//!
//! SUCCESS on a delivery means the provider took the message. A receipt says more: the SMS
//! reached the phone (DELIVERED), it did not (UNDELIVERED, with the provider's reason), or
//! the email bounced (BOUNCED, hard or soft). It is kept beside the delivery status, which
//! keeps its meaning, and travels on with a delivery event (so the read model, history and
//! dashboard learn it) and a status event when it changes the notification's status (it
//! does not: a receipt leaves the delivery SUCCESS).
//!
//! [`accept`] applies one verified receipt in one transaction:
//! - the receipt is stored under its `webhook-id` first, so a replay is refused;
//! - its delivery is found by the provider's message id (`providerRef`, which a gateway's
//!   answer to the send carried; for email, the delivery id in the Message-ID);
//! - it is applied unless a receipt with a later provider time was applied already (an
//!   out-of-order receipt changes nothing, and is kept as `superseded`);
//! - a permanent failure (a hard bounce, an undeliverable reason the provider calls
//!   permanent) suppresses the address on that channel ([`crate::suppressions`]).
//!
//! A receipt for a message no delivery has (yet) is kept unmatched and answered 404: the
//! provider may have called back before Herald recorded the send. [`apply_unmatched`]
//! matches such receipts once the send is recorded, for [`UNMATCHED_FOR`].

pub mod dsn;
pub mod poll;

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    domain::{Channel, ReceiptStatus},
    suppressions,
};

/// How long an unmatched receipt waits for its delivery.
pub const UNMATCHED_FOR: Duration = Duration::from_secs(600);

/// How often [`apply_unmatched`] runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// A delivery's receipt state, as the API, delivery events and the read model show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptState {
    pub status: ReceiptStatus,
    /// The provider's reason, for UNDELIVERED and BOUNCED.
    pub reason: Option<String>,
    /// A hard bounce, or an undeliverable reason the provider calls permanent: the address
    /// is suppressed on this channel.
    pub permanent: bool,
    /// When the provider says it happened.
    pub at: DateTime<Utc>,
}

/// A row's receipt columns (`receipt_status`, `receipt_reason`, `receipt_permanent`,
/// `receipt_at`, in `deliveries` and `notification_log`), shown as one `receipt` object:
/// null until a receipt.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct ReceiptColumns {
    pub receipt_status: Option<ReceiptStatus>,
    pub receipt_reason: Option<String>,
    pub receipt_permanent: Option<bool>,
    pub receipt_at: Option<DateTime<Utc>>,
}

impl ReceiptColumns {
    /// The receipt state these columns hold, if any.
    pub fn state(&self) -> Option<ReceiptState> {
        Some(ReceiptState {
            status: self.receipt_status?,
            reason: self.receipt_reason.clone(),
            permanent: self.receipt_permanent.unwrap_or(false),
            at: self.receipt_at?,
        })
    }
}

impl Serialize for ReceiptColumns {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.state().serialize(serializer)
    }
}

/// One verified receipt.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub channel: Channel,
    /// The Standard Webhooks `webhook-id`: unique per receipt.
    pub webhook_id: String,
    /// The provider's message id (for email, the delivery id).
    pub provider_ref: String,
    pub state: ReceiptState,
}

/// What became of a receipt.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// Applied to the delivery (and the address suppressed when `suppressed`).
    Applied { delivery_id: Uuid, suppressed: bool },
    /// Its delivery already has a receipt from a later time: kept, not applied.
    Superseded { delivery_id: Uuid },
    /// No delivery has this message id yet: kept for [`UNMATCHED_FOR`].
    Unmatched,
    /// This `webhook-id` was received before: nothing done.
    Replayed,
}

impl Accepted {
    fn label(&self) -> &'static str {
        match self {
            Accepted::Applied { .. } => "applied",
            Accepted::Superseded { .. } => "superseded",
            Accepted::Unmatched => "unmatched",
            Accepted::Replayed => "replayed",
        }
    }
}

/// Stores and applies one receipt (see the module docs).
///
/// `delivery` is the delivery when the caller knows it (a poll of its message); else it is
/// found by the message id.
pub async fn accept(
    db: &PgPool,
    receipt: &Receipt,
    delivery: Option<Uuid>,
    topic_prefix: &str,
) -> anyhow::Result<Accepted> {
    let mut tx = db.begin().await.context("Failed to begin")?;
    let stored = sqlx::query(
        "INSERT INTO receipts (channel, webhook_id, provider_ref, status, reason, permanent, occurred_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(receipt.channel)
    .bind(&receipt.webhook_id)
    .bind(&receipt.provider_ref)
    .bind(receipt.state.status)
    .bind(&receipt.state.reason)
    .bind(receipt.state.permanent)
    .bind(receipt.state.at)
    .execute(&mut *tx)
    .await
    .context("Failed to store a receipt")?
    .rows_affected();
    let accepted = if stored == 0 {
        Accepted::Replayed
    } else {
        let found = match delivery {
            Some(id) => Some(id),
            None => find_delivery(&mut tx, receipt.channel, &receipt.provider_ref).await?,
        };
        match found {
            Some(delivery_id) => apply(&mut tx, receipt, delivery_id, topic_prefix).await?,
            None => Accepted::Unmatched,
        }
    };
    tx.commit().await.context("Failed to commit a receipt")?;
    count(receipt, &accepted);
    Ok(accepted)
}

fn count(receipt: &Receipt, accepted: &Accepted) {
    metrics::counter!(
        "herald_receipts_total",
        "channel" => receipt.channel.as_str(),
        "status" => receipt.state.status.as_str(),
        "outcome" => accepted.label()
    )
    .increment(1);
    if let Accepted::Applied {
        suppressed: true, ..
    } = accepted
    {
        metrics::counter!("herald_suppressions_total", "channel" => receipt.channel.as_str())
            .increment(1);
    }
}

/// The delivery a provider's message id names: a sent one of that channel.
async fn find_delivery(
    conn: &mut PgConnection,
    channel: Channel,
    provider_ref: &str,
) -> anyhow::Result<Option<Uuid>> {
    let found = if channel == Channel::Email {
        // An email's Message-ID is <delivery id@herald>: the reference is the delivery id.
        let Ok(id) = provider_ref.parse::<Uuid>() else {
            return Ok(None);
        };
        sqlx::query_scalar(
            "SELECT id FROM deliveries WHERE id = $1 AND channel = 'EMAIL' AND status = 'SUCCESS'",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
    } else {
        // On the channel it went out on: a KAKAOTALK delivery sent by its SMS fallback has
        // the SMS gateway's message id, and the SMS gateway sends its receipt.
        sqlx::query_scalar(
            "SELECT id FROM deliveries WHERE COALESCE(sent_via, channel) = $1 \
                 AND provider_ref = $2 AND provider_ref IS NOT NULL \
                 AND COALESCE(sent_via, channel) IN ('SMS', 'KAKAOTALK', 'PUSH') \
                 AND status = 'SUCCESS' \
             ORDER BY created_at DESC LIMIT 1",
        )
        .bind(channel)
        .bind(provider_ref)
        .fetch_optional(&mut *conn)
        .await
    };
    found.context("Failed to find a receipt's delivery")
}

/// Applies a stored receipt to its delivery, unless a later one was applied already.
async fn apply(
    conn: &mut PgConnection,
    receipt: &Receipt,
    delivery_id: Uuid,
    topic_prefix: &str,
) -> anyhow::Result<Accepted> {
    let state = &receipt.state;
    let recorded =
        crate::deliveries::record_receipt(&mut *conn, delivery_id, state, topic_prefix).await?;
    let accepted = match recorded {
        None => Accepted::Superseded { delivery_id },
        Some((sent_on, address)) => {
            let suppressed = match (&address, state.permanent, state.status) {
                (Some(address), true, ReceiptStatus::Undelivered | ReceiptStatus::Bounced) => {
                    let reason = format!(
                        "{}: {}",
                        state.status.as_str().to_lowercase(),
                        state.reason.as_deref().unwrap_or("permanent")
                    );
                    suppressions::add(&mut *conn, sent_on, address, &reason, delivery_id).await?
                }
                _ => false,
            };
            Accepted::Applied {
                delivery_id,
                suppressed,
            }
        }
    };
    let outcome = match accepted {
        Accepted::Superseded { .. } => "superseded",
        _ => "applied",
    };
    sqlx::query(
        "UPDATE receipts SET delivery_id = $3, outcome = $4 WHERE channel = $1 AND webhook_id = $2",
    )
    .bind(receipt.channel)
    .bind(&receipt.webhook_id)
    .bind(delivery_id)
    .bind(outcome)
    .execute(&mut *conn)
    .await
    .context("Failed to mark a receipt")?;
    Ok(accepted)
}

/// A receipt waiting for its delivery.
#[derive(sqlx::FromRow)]
struct Unmatched {
    channel: Channel,
    webhook_id: String,
    provider_ref: String,
    status: ReceiptStatus,
    reason: Option<String>,
    permanent: bool,
    occurred_at: DateTime<Utc>,
}

/// Applies the receipts that arrived before their send was recorded and whose delivery now
/// exists; returns how many. Several instances may run it: rows are taken with SKIP LOCKED.
pub async fn apply_unmatched(db: &PgPool, topic_prefix: &str) -> anyhow::Result<usize> {
    let mut tx = db.begin().await.context("Failed to begin")?;
    let waiting: Vec<Unmatched> = sqlx::query_as(
        "SELECT channel, webhook_id, provider_ref, status, reason, permanent, occurred_at \
         FROM receipts WHERE delivery_id IS NULL AND received_at > now() - $1 \
         ORDER BY checked_at NULLS FIRST LIMIT 200 FOR UPDATE SKIP LOCKED",
    )
    .bind(UNMATCHED_FOR)
    .fetch_all(&mut *tx)
    .await
    .context("Failed to read unmatched receipts")?;
    let mut applied = 0;
    let (mut unmatched_channels, mut unmatched_ids) = (Vec::new(), Vec::new());
    for row in waiting {
        let Some(delivery_id) = find_delivery(&mut tx, row.channel, &row.provider_ref).await?
        else {
            unmatched_channels.push(row.channel);
            unmatched_ids.push(row.webhook_id);
            continue;
        };
        let receipt = Receipt {
            channel: row.channel,
            webhook_id: row.webhook_id,
            provider_ref: row.provider_ref,
            state: ReceiptState {
                status: row.status,
                reason: row.reason,
                permanent: row.permanent,
                at: row.occurred_at,
            },
        };
        let accepted = apply(&mut tx, &receipt, delivery_id, topic_prefix).await?;
        count(&receipt, &accepted);
        applied += 1;
    }
    // The ones still unmatched go to the back, so that more than a round's worth of them
    // cannot keep newer ones from being looked at.
    sqlx::query(
        "UPDATE receipts SET checked_at = now() \
         FROM UNNEST($1::text[], $2::text[]) AS t(channel, webhook_id) \
         WHERE receipts.channel = t.channel AND receipts.webhook_id = t.webhook_id",
    )
    .bind(&unmatched_channels)
    .bind(&unmatched_ids)
    .execute(&mut *tx)
    .await
    .context("Failed to mark unmatched receipts")?;
    tx.commit().await.context("Failed to commit receipts")?;
    Ok(applied)
}

/// Runs [`apply_unmatched`] every [`SWEEP_EVERY`] until `shutdown` (instances with the api
/// role, which take the receipts in).
pub async fn run(db: PgPool, topic_prefix: String, shutdown: tokio_util::sync::CancellationToken) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match apply_unmatched(&db, &topic_prefix).await {
            Ok(0) => {}
            Ok(applied) => tracing::info!(applied, "receipts that came before their send applied"),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "cannot apply unmatched receipts"
            ),
        }
    }
}
