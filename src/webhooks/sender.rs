//! Making webhook calls: claim due calls (a lease, `SKIP LOCKED`, so instances share them),
//! send each signed, record the answer (see the module docs of [`super`] for the rules).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{is_public, webhook_id};
use crate::{
    config::WebhookSettings,
    domain::Domain,
    outbox::{self, DeadLetter},
};

/// Calls claimed at once (and sent concurrently) per round.
const CLAIM: i64 = 32;

/// How long a claimed call is held; a sender that dies is replaced after it.
const LEASE: Duration = Duration::from_secs(60);

/// How long one call may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// How often an idle sender looks for due calls.
const POLL: Duration = Duration::from_millis(500);

/// The header that names the call a dead letter is about (its retry re-queues the call).
pub const WEBHOOK_CALL_HEADER: &str = "X-Webhook-Delivery-Id";

/// Sends webhook calls.
pub struct Sender {
    pub db: PgPool,
    pub settings: WebhookSettings,
    pub topic_prefix: String,
    /// Posts a line to the operators' Slack channel, when one is configured.
    pub announcer: Option<Arc<dyn Fn(String) + Send + Sync>>,
    /// Woken when calls were made, so they go out without waiting for the next poll.
    pub wake: Arc<Notify>,
    client: reqwest::Client,
}

/// A claimed call.
#[derive(sqlx::FromRow)]
struct Claimed {
    id: Uuid,
    endpoint_id: Uuid,
    url: String,
    secret: String,
    payload: Vec<u8>,
    attempts: i32,
    give_up_at: DateTime<Utc>,
    lease_until: DateTime<Utc>,
}

/// A name resolver that refuses names resolving to non-public addresses (DNS rebinding: a
/// name checked when the endpoint was made may point elsewhere later).
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            if let Some(bad) = addresses.iter().find(|a| !is_public(a.ip())) {
                return Err(format!(
                    "{} resolves to {}, which is not a public address",
                    name.as_str(),
                    bad.ip()
                )
                .into());
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Sender {
    pub fn new(
        db: PgPool,
        settings: WebhookSettings,
        topic_prefix: String,
        announcer: Option<Arc<dyn Fn(String) + Send + Sync>>,
        wake: Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let mut client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve the name itself, past the check below.
            .no_proxy()
            .user_agent(concat!("Herald-Webhooks/", env!("CARGO_PKG_VERSION")));
        if !settings.allow_private {
            client = client.dns_resolver(Arc::new(PublicOnly));
        }
        Ok(Sender {
            db,
            settings,
            topic_prefix,
            announcer,
            wake,
            client: client
                .build()
                .context("Failed to build the webhook client")?,
        })
    }

    /// Sends due calls until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            let sent = match self.step().await {
                Ok(sent) => sent,
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "cannot send webhook calls");
                    0
                }
            };
            if sent > 0 {
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Claims due calls and sends them; returns how many were sent.
    pub async fn step(&self) -> anyhow::Result<usize> {
        let claimed: Vec<Claimed> = sqlx::query_as(
            "WITH due AS (SELECT d.id FROM webhook_deliveries d \
                 JOIN webhook_endpoints e ON e.id = d.endpoint_id \
                 WHERE d.status = 'PENDING' AND d.next_attempt_at <= now() \
                   AND (d.lease_until IS NULL OR d.lease_until < now()) \
                   AND e.disabled_at IS NULL AND e.deleted_at IS NULL \
                 ORDER BY d.next_attempt_at LIMIT $1 FOR UPDATE OF d SKIP LOCKED) \
             UPDATE webhook_deliveries w SET lease_until = now() + $2, \
                 attempts = w.attempts + 1, last_attempt_at = now() \
             FROM due, webhook_endpoints e WHERE w.id = due.id AND e.id = w.endpoint_id \
             RETURNING w.id, w.endpoint_id, e.url, e.secret, w.payload, w.attempts, \
                 w.give_up_at, w.lease_until",
        )
        .bind(CLAIM)
        .bind(LEASE)
        .fetch_all(&self.db)
        .await
        .context("Failed to claim webhook calls")?;
        let sent = claimed.len();
        let results = futures_util::future::join_all(claimed.iter().map(|c| self.send(c))).await;
        for (call, result) in claimed.iter().zip(results) {
            self.record(call, result).await?;
        }
        Ok(sent)
    }

    /// Makes one call: `Ok(status)` for a 2xx answer, else the answer's status (if any) and
    /// what went wrong.
    async fn send(&self, call: &Claimed) -> Result<u16, (Option<u16>, String)> {
        // An address written in the URL never reaches the resolver: check it here.
        if !self.settings.allow_private
            && url::Url::parse(&call.url)
                .ok()
                .is_some_and(|u| matches!(u.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_))))
            && let Err(refused) = super::check_url(&call.url, false).await
        {
            return Err((None, refused.0));
        }
        let id = webhook_id(call.id);
        let timestamp = Utc::now().timestamp();
        let signature = standardwebhooks::Webhook::new(&call.secret)
            .and_then(|w| w.sign(&id, timestamp, &call.payload))
            .map_err(|e| (None, format!("cannot sign the call: {e}")))?;
        let response = self
            .client
            .post(&call.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(call.payload.clone())
            .send()
            .await
            .map_err(|e| {
                let e = e.without_url();
                let why = std::error::Error::source(&e)
                    .map(|s| format!("{e}: {s}"))
                    .unwrap_or_else(|| e.to_string());
                (None, why)
            })?;
        let status = response.status();
        if status.is_success() {
            Ok(status.as_u16())
        } else {
            Err((Some(status.as_u16()), format!("answered {status}")))
        }
    }

    /// Records a call's answer, and the endpoint's health with it; nothing when the call's
    /// lease ran out meanwhile (another sender owns it, or the endpoint was deleted).
    async fn record(
        &self,
        call: &Claimed,
        result: Result<u16, (Option<u16>, String)>,
    ) -> anyhow::Result<()> {
        let (status, code, error) = match &result {
            Ok(code) => ("SUCCESS", Some(*code), None),
            Err((code, error)) if Utc::now() >= call.give_up_at => {
                ("FAILED", *code, Some(error.as_str()))
            }
            Err((code, error)) => ("PENDING", *code, Some(error.as_str())),
        };
        let steps = &self.settings.backoff;
        let wait = steps[(call.attempts.max(1) as usize - 1).min(steps.len() - 1)];
        let mut tx = self.db.begin().await.context("Failed to begin")?;
        let matched = sqlx::query(
            "UPDATE webhook_deliveries SET status = $3, last_status_code = $4, last_error = $5, \
                 lease_until = NULL, \
                 completed_at = CASE WHEN $3 = 'PENDING' THEN NULL ELSE now() END, \
                 next_attempt_at = CASE WHEN $3 = 'PENDING' THEN now() + $6 \
                     ELSE next_attempt_at END \
             WHERE id = $1 AND lease_until = $2 AND status = 'PENDING'",
        )
        .bind(call.id)
        .bind(call.lease_until)
        .bind(status)
        .bind(code.map(i32::from))
        .bind(error)
        .bind(wait)
        .execute(&mut *tx)
        .await
        .context("Failed to record a webhook call")?
        .rows_affected();
        let outcome = match (matched, status) {
            (0, _) => "lease_lost",
            (_, "SUCCESS") => {
                sqlx::query(
                    "UPDATE webhook_endpoints SET failing_since = NULL \
                     WHERE id = $1 AND failing_since IS NOT NULL",
                )
                .bind(call.endpoint_id)
                .execute(&mut *tx)
                .await
                .context("Failed to record an endpoint's health")?;
                "success"
            }
            (_, failed) => {
                if failed == "FAILED" {
                    let error = error.unwrap_or_default();
                    outbox::insert(&mut tx, &[self.dead_letter(call, error)]).await?;
                }
                self.note_failure(&mut tx, call.endpoint_id).await?;
                if failed == "FAILED" {
                    "dead_lettered"
                } else {
                    "retry"
                }
            }
        };
        tx.commit()
            .await
            .context("Failed to commit a webhook call")?;
        metrics::counter!("herald_webhook_calls_total", "outcome" => outcome).increment(1);
        Ok(())
    }

    /// Marks the endpoint failing, and disables it (once, reported) when it has failed for
    /// `disable_after`.
    async fn note_failure(
        &self,
        tx: &mut sqlx::PgConnection,
        endpoint: Uuid,
    ) -> anyhow::Result<()> {
        // Two statements: one statement cannot update a row twice (a WITH would hide the
        // first update from the second).
        sqlx::query(
            "UPDATE webhook_endpoints SET failing_since = now() \
             WHERE id = $1 AND failing_since IS NULL",
        )
        .bind(endpoint)
        .execute(&mut *tx)
        .await
        .context("Failed to record an endpoint's health")?;
        let disabled: Option<(String, DateTime<Utc>)> = sqlx::query_as(
            "UPDATE webhook_endpoints SET disabled_at = now(), \
                 disabled_reason = 'every call failed since ' \
                     || to_char(failing_since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
             WHERE id = $1 AND disabled_at IS NULL AND failing_since <= now() - $2 \
             RETURNING url, failing_since",
        )
        .bind(endpoint)
        .bind(self.settings.disable_after)
        .fetch_optional(&mut *tx)
        .await
        .context("Failed to record an endpoint's health")?;
        if disabled.is_some() {
            // Its calls wait outside the due index until it is enabled (with a fresh window).
            sqlx::query(
                "UPDATE webhook_deliveries SET next_attempt_at = '9999-01-01T00:00:00Z' \
                 WHERE endpoint_id = $1 AND status = 'PENDING'",
            )
            .bind(endpoint)
            .execute(&mut *tx)
            .await
            .context("Failed to hold a disabled endpoint's calls")?;
        }
        if let Some((url, since)) = disabled {
            metrics::counter!("herald_webhook_endpoints_disabled_total").increment(1);
            tracing::error!(%endpoint, %since, "webhook endpoint disabled: every call has failed for too long");
            if let Some(announce) = &self.announcer {
                let host = url::Url::parse(&url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_owned))
                    .unwrap_or_default();
                announce(format!(
                    ":no_entry: Herald: webhook endpoint {endpoint} ({host}) was disabled: every call has failed since {since}. Its calls wait; POST /api/v1/webhooks/{endpoint}/enable sends them again."
                ));
            }
        }
        Ok(())
    }

    /// The dead letter of a call that failed until its deadline, for the operators.
    fn dead_letter(&self, call: &Claimed, error: &str) -> outbox::OutboxMessage {
        let mut message = DeadLetter {
            domain: Some(Domain::Api),
            error_message: format!("webhook endpoint {}: {error}", call.endpoint_id),
            error_class: "webhook_exhausted".to_owned(),
            retry_count: call.attempts.max(1) as u32 - 1,
            failed_channel: None,
            original_topic: None,
            original_partition: None,
            original_offset: None,
            consumer_group: None,
            event_id: None,
            notification_id: None,
            delivery_id: None,
            failed_at: Utc::now(),
            replay: None,
        }
        .to_outbox(
            &self.topic_prefix,
            Some(call.endpoint_id.to_string().into_bytes()),
            call.payload.clone(),
        );
        message
            .headers
            .insert(WEBHOOK_CALL_HEADER.to_owned(), call.id.to_string());
        message
    }
}

/// Puts a dead-lettered call back to PENDING, due now, with a fresh window as long as its
/// first (an operator's retry of its dead letter); false when it is not FAILED or its
/// endpoint was deleted.
pub async fn requeue(conn: &mut sqlx::PgConnection, call: Uuid) -> anyhow::Result<bool> {
    let requeued = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'PENDING', next_attempt_at = now(), \
             give_up_at = now() + retry_window, completed_at = NULL, attempts = 0 \
         WHERE id = $1 AND status = 'FAILED' \
           AND endpoint_id IN (SELECT id FROM webhook_endpoints WHERE deleted_at IS NULL)",
    )
    .bind(call)
    .execute(conn)
    .await
    .context("Failed to re-queue a webhook call")?
    .rows_affected();
    Ok(requeued == 1)
}
