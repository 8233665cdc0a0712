//! Polling for receipts, for gateways that do not call back (issue 15).
//!
//! When a gateway channel has a status URL (`HERALD_SMS_STATUS_URL`, ... with `{messageId}`
//! where the message id goes), the record of each send it accepted with a message id adds a
//! row to `receipt_polls` in the same transaction. The poller takes due rows (a lease, `SKIP
//! LOCKED`: instances share them), asks `GET {status URL}` (with the gateway's bearer key),
//! and reads `{"status", "reason", "permanent", "occurredAt"}`: DELIVERED or UNDELIVERED is
//! final and applied like a receipt posted to the API (webhook-id `poll:{delivery id}`, so
//! it is applied once); anything else (PENDING, SENT, a 404, a 5xx, a timeout) asks again
//! after the next wait of `HERALD_RECEIPT_POLL_BACKOFF_MS`, until
//! `HERALD_RECEIPT_POLL_DEADLINE` passes and Herald gives up on that message's receipt.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Accepted, Receipt, ReceiptState};
use crate::domain::{Channel, ReceiptStatus};

/// Polls claimed at once per round.
const CLAIM: i64 = 50;

/// How long a claimed poll is held.
const LEASE: Duration = Duration::from_secs(60);

/// How often an idle poller looks for due polls.
const IDLE: Duration = Duration::from_secs(1);

/// What a gateway's status URL answers.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusAnswer {
    status: String,
    reason: Option<String>,
    #[serde(default)]
    permanent: bool,
    occurred_at: Option<DateTime<Utc>>,
}

/// The poller of every gateway channel with a status URL.
pub struct Poller {
    pub db: PgPool,
    pub topic_prefix: String,
    /// Per channel: the status URL template.
    pub urls: BTreeMap<Channel, String>,
    /// Per channel: the gateway's bearer key.
    pub keys: BTreeMap<Channel, SecretString>,
    pub backoff: Vec<Duration>,
    client: reqwest::Client,
}

/// A claimed poll.
#[derive(sqlx::FromRow)]
struct Due {
    delivery_id: Uuid,
    channel: Channel,
    provider_ref: String,
    attempts: i32,
    give_up_at: DateTime<Utc>,
}

/// The status URL of a message: the template with `{messageId}` filled in (escaped), or
/// `?messageId=` added when the template has no placeholder.
pub fn status_url(template: &str, message_id: &str) -> String {
    let escaped: String = url::form_urlencoded::byte_serialize(message_id.as_bytes()).collect();
    if template.contains("{messageId}") {
        template.replace("{messageId}", &escaped)
    } else {
        let joiner = if template.contains('?') { '&' } else { '?' };
        format!("{template}{joiner}messageId={escaped}")
    }
}

impl Poller {
    pub fn new(
        db: PgPool,
        topic_prefix: String,
        urls: BTreeMap<Channel, String>,
        keys: BTreeMap<Channel, SecretString>,
        backoff: Vec<Duration>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        Ok(Poller {
            db,
            topic_prefix,
            urls,
            keys,
            backoff,
            client: crate::channels::http_client(timeout)?,
        })
    }

    /// Polls due messages until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            let polled = match self.step().await {
                Ok(n) => n,
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "cannot poll for receipts");
                    0
                }
            };
            if polled > 0 {
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(IDLE) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Polls the due messages once; returns how many.
    pub async fn step(&self) -> anyhow::Result<usize> {
        let due: Vec<Due> = sqlx::query_as(
            "WITH due AS (SELECT delivery_id FROM receipt_polls \
                 WHERE next_poll_at <= now() AND (lease_until IS NULL OR lease_until < now()) \
                 ORDER BY next_poll_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
             UPDATE receipt_polls p SET lease_until = now() + $2, attempts = p.attempts + 1 \
             FROM due WHERE p.delivery_id = due.delivery_id \
             RETURNING p.delivery_id, p.channel, p.provider_ref, p.attempts, p.give_up_at",
        )
        .bind(CLAIM)
        .bind(LEASE)
        .fetch_all(&self.db)
        .await
        .context("Failed to claim receipt polls")?;
        let answers = futures_util::future::join_all(due.iter().map(|d| self.ask(d))).await;
        for (poll, answer) in due.iter().zip(answers) {
            self.settle(poll, answer).await?;
        }
        Ok(due.len())
    }

    /// Asks the gateway; `Ok(Some(state))` for a final answer, `Ok(None)` for "not yet", `Err`
    /// for a failure to ask.
    async fn ask(&self, poll: &Due) -> Result<Option<ReceiptState>, String> {
        let Some(template) = self.urls.get(&poll.channel) else {
            return Err(format!("no status URL for {} any more", poll.channel));
        };
        let mut request = self.client.get(status_url(template, &poll.provider_ref));
        if let Some(key) = self.keys.get(&poll.channel) {
            request = request.bearer_auth(key.expose_secret());
        }
        let response = request
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(format!("status URL answered {status}"));
        }
        let answer: StatusAnswer = response
            .json()
            .await
            .map_err(|e| format!("status URL answered something else than a status: {e}"))?;
        let Ok(receipt) = answer.status.parse::<ReceiptStatus>() else {
            return Ok(None);
        };
        if receipt == ReceiptStatus::Bounced {
            return Err("a gateway reports UNDELIVERED, not BOUNCED".to_owned());
        }
        Ok(Some(ReceiptState {
            status: receipt,
            permanent: receipt == ReceiptStatus::Undelivered && answer.permanent,
            reason: answer
                .reason
                .map(|r| r.replace('\0', "").chars().take(1000).collect()),
            at: answer.occurred_at.unwrap_or_else(Utc::now),
        }))
    }

    /// Applies a final answer (and forgets the poll), or schedules the next poll (or gives up
    /// past the deadline).
    async fn settle(
        &self,
        poll: &Due,
        answer: Result<Option<ReceiptState>, String>,
    ) -> anyhow::Result<()> {
        let outcome = match answer {
            Ok(Some(state)) => {
                let receipt = Receipt {
                    channel: poll.channel,
                    webhook_id: format!("poll:{}", poll.delivery_id),
                    provider_ref: poll.provider_ref.clone(),
                    state,
                };
                let accepted = super::accept(
                    &self.db,
                    &receipt,
                    Some(poll.delivery_id),
                    &self.topic_prefix,
                )
                .await?;
                self.forget(poll.delivery_id).await?;
                match accepted {
                    Accepted::Applied { .. } | Accepted::Replayed => "final",
                    _ => "superseded",
                }
            }
            answer => {
                let steps = &self.backoff;
                let wait = steps[(poll.attempts.max(1) as usize - 1).min(steps.len() - 1)];
                let next = Utc::now() + wait;
                if next > poll.give_up_at {
                    self.forget(poll.delivery_id).await?;
                    "expired"
                } else {
                    sqlx::query(
                        "UPDATE receipt_polls SET next_poll_at = $2, lease_until = NULL, \
                             last_error = $3 WHERE delivery_id = $1",
                    )
                    .bind(poll.delivery_id)
                    .bind(next)
                    .bind(answer.err())
                    .execute(&self.db)
                    .await
                    .context("Failed to schedule a receipt poll")?;
                    "not_yet"
                }
            }
        };
        metrics::counter!("herald_receipt_polls_total", "channel" => poll.channel.as_str(), "outcome" => outcome)
            .increment(1);
        Ok(())
    }

    async fn forget(&self, delivery: Uuid) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM receipt_polls WHERE delivery_id = $1")
            .bind(delivery)
            .execute(&self.db)
            .await
            .context("Failed to forget a receipt poll")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::status_url;

    #[test]
    fn the_message_id_goes_where_the_template_says_escaped_or_into_the_query() {
        assert_eq!(
            status_url("https://gw.example/status/{messageId}", "m 1/2"),
            "https://gw.example/status/m+1%2F2"
        );
        assert_eq!(
            status_url("https://gw.example/status?account=7", "m-1"),
            "https://gw.example/status?account=7&messageId=m-1"
        );
        assert_eq!(
            status_url("https://gw.example/status", "m-1"),
            "https://gw.example/status?messageId=m-1"
        );
    }
}
