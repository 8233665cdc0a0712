//! Signed outbound webhooks (issue 15), for upstream services that do not read Kafka.
//!
//! An endpoint (`POST /api/v1/webhooks`) names a URL and the kinds of event it wants:
//! `delivery` (notification.delivery.events), `notification_status`
//! (notification.status.events) and `broadcast` (notification.broadcast.events). Herald
//! reads those topics in a consumer group of its own ([`fanout`], group `notif-webhooks`)
//! and writes one call per event and subscribed endpoint into `webhook_deliveries`, keyed by
//! the record's topic position, so a record read twice is one call. [`sender`] makes the
//! calls, signed the Standard Webhooks way with the endpoint's secret (shown once, when the
//! endpoint is made): `webhook-id` (the same on every retry, for the receiver to drop a
//! repeat), `webhook-timestamp` and `webhook-signature`. A call that is not answered 2xx is
//! retried with backoff for `give_up_after` (24 h), then dead-lettered to the operators
//! (notification.dlq.api, `X-Error-Class: webhook_exhausted`; retrying that letter re-queues
//! the call). An endpoint whose calls have all failed for `disable_after` (24 h) is
//! disabled, and reported on the ops Slack channel; its calls wait until it is enabled
//! again. Every call is kept as the endpoint's delivery log.
//!
//! A webhook URL is where Herald's own network sends requests for whoever may make one, so
//! URLs whose host resolves to a loopback, private, link-local or otherwise non-public
//! address are refused ([`check_url`]), when the endpoint is made and again on every call
//! (through the HTTP client's resolver, so a name that later resolves elsewhere is caught),
//! unless `HERALD_WEBHOOKS_ALLOW_PRIVATE` allows them. Redirects are not followed.

pub mod fanout;
pub mod sender;

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use url::Url;
use uuid::Uuid;

use crate::{
    broadcast::BROADCAST_EVENTS_TOPIC, outbox::DELIVERY_EVENTS_TOPIC,
    status_events::STATUS_EVENTS_TOPIC,
};

/// What an endpoint may subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = WebhookKind)]
pub enum Kind {
    /// Every delivery state change (and receipt).
    Delivery,
    /// A notification's overall status when it changes.
    NotificationStatus,
    /// A broadcast's lifecycle events.
    Broadcast,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 3] = [Kind::Delivery, Kind::NotificationStatus, Kind::Broadcast];

    /// The database and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Delivery => "delivery",
            Kind::NotificationStatus => "notification_status",
            Kind::Broadcast => "broadcast",
        }
    }

    /// The topic its events are on, without prefix.
    pub fn topic(self) -> &'static str {
        match self {
            Kind::Delivery => DELIVERY_EVENTS_TOPIC,
            Kind::NotificationStatus => STATUS_EVENTS_TOPIC,
            Kind::Broadcast => BROADCAST_EVENTS_TOPIC,
        }
    }

    /// The kind whose events are on `topic` (without prefix).
    pub fn of_topic(topic: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.topic() == topic)
    }
}

impl std::str::FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("{s:?} is not an event kind (delivery, notification_status, broadcast)")
            })
    }
}

/// An endpoint as the API shows it (never with its secret after it was made).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = WebhookEndpoint)]
pub struct Endpoint {
    pub id: Uuid,
    pub url: String,
    #[schema(value_type = Vec<Kind>)]
    pub kinds: Vec<String>,
    pub description: Option<String>,
    /// The name of the credential that made it.
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    /// Since when every call has failed; null while it answers.
    pub failing_since: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
}

/// The columns of an [`Endpoint`], for `concat!` into its statements.
macro_rules! endpoint_columns {
    () => {
        "id, url, kinds, description, created_by, created_at, failing_since, disabled_at, \
         disabled_reason"
    };
}

/// Why a URL is refused as a webhook endpoint; the message is meant for the caller.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Checks a webhook URL: http(s), with a host, and (unless `allow_private`) every address it
/// resolves to public.
pub async fn check_url(raw: &str, allow_private: bool) -> Result<Url, Refused> {
    let url =
        Url::parse(raw.trim()).map_err(|e| Refused(format!("url: {raw:?} is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refused("url: must be http:// or https://".to_owned()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refused(
            "url: must not carry credentials; each call is signed with the endpoint's secret"
                .to_owned(),
        ));
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(Refused("url: has no host".to_owned()));
    };
    if allow_private {
        return Ok(url);
    }
    let port = url.port_or_known_default().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Refused(format!("url: cannot resolve {host:?} ({e})")))?
        .collect();
    if let Some(address) = addresses.iter().find(|a| !is_public(a.ip())) {
        return Err(Refused(format!(
            "url: {host:?} resolves to {}, which is not a public address (loopback, private, link-local and the like are refused unless HERALD_WEBHOOKS_ALLOW_PRIVATE=true)",
            address.ip()
        )));
    }
    Ok(url)
}

/// Whether an address is one a webhook may be sent to: not loopback, private, link-local,
/// unique- or site-local, shared (CGNAT), reserved, documentation, multicast, broadcast or
/// unspecified, including IPv4 addresses carried inside IPv6 ones (mapped, compatible,
/// NAT64, 6to4).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let [first, second, third, _] = a.octets();
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || first == 0
                || first >= 240
                || (first == 100 && (second & 0xc0) == 64)
                || (first == 198 && (second & 0xfe) == 18)
                || (first == 192 && second == 0 && third == 0))
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            let embedded = |hi: u16, lo: u16| {
                std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
            };
            // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible)
            if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) && !(s[6] == 0 && s[7] <= 1) {
                return is_public(IpAddr::V4(embedded(s[6], s[7])));
            }
            // 64:ff9b::a.b.c.d (NAT64) and 64:ff9b:1::/48
            if s[0] == 0x64 && s[1] == 0xff9b {
                return is_public(IpAddr::V4(embedded(s[6], s[7])));
            }
            // 2002:aabb:ccdd::/48 (6to4)
            if s[0] == 0x2002 {
                return is_public(IpAddr::V4(embedded(s[1], s[2])));
            }
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0x0db8))
        }
    }
}

/// A new endpoint's secret: `whsec_` and 32 random bytes in base64, as Standard Webhooks
/// libraries take it.
fn new_secret() -> anyhow::Result<String> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// Makes an endpoint; returns it with its secret (the only time the secret is shown).
pub async fn create(
    db: &PgPool,
    url: &Url,
    kinds: &[Kind],
    description: Option<&str>,
    created_by: &str,
) -> anyhow::Result<(Endpoint, String)> {
    let secret = new_secret()?;
    let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    let endpoint = sqlx::query_as(concat!(
        "INSERT INTO webhook_endpoints (id, url, kinds, secret, description, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING ",
        endpoint_columns!()
    ))
    .bind(Uuid::now_v7())
    .bind(url.as_str())
    .bind(&kinds)
    .bind(&secret)
    .bind(description)
    .bind(created_by)
    .fetch_one(db)
    .await
    .context("Failed to store a webhook endpoint")?;
    Ok((endpoint, secret))
}

/// Every endpoint not deleted, newest first.
pub async fn list(db: &PgPool) -> anyhow::Result<Vec<Endpoint>> {
    sqlx::query_as(concat!(
        "SELECT ",
        endpoint_columns!(),
        " FROM webhook_endpoints WHERE deleted_at IS NULL ORDER BY id DESC"
    ))
    .fetch_all(db)
    .await
    .context("Failed to list webhook endpoints")
}

/// One endpoint not deleted.
pub async fn get(db: &PgPool, id: Uuid) -> anyhow::Result<Option<Endpoint>> {
    sqlx::query_as(concat!(
        "SELECT ",
        endpoint_columns!(),
        " FROM webhook_endpoints WHERE id = $1 AND deleted_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
    .context("Failed to read a webhook endpoint")
}

/// Deletes an endpoint (kept for audit; its pending calls are dropped); false when there is
/// no such endpoint.
pub async fn delete(db: &PgPool, id: Uuid, by: &str) -> anyhow::Result<bool> {
    let mut tx = db.begin().await.context("Failed to begin")?;
    let deleted = sqlx::query(
        "UPDATE webhook_endpoints SET deleted_at = now(), deleted_by = $2 \
         WHERE id = $1 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(by)
    .execute(&mut *tx)
    .await
    .context("Failed to delete a webhook endpoint")?
    .rows_affected();
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'FAILED', last_error = 'endpoint deleted', \
             completed_at = now() WHERE endpoint_id = $1 AND status = 'PENDING'",
    )
    .bind(id)
    .execute(&mut *tx)
    .await
    .context("Failed to drop a deleted endpoint's calls")?;
    tx.commit().await.context("Failed to commit")?;
    Ok(deleted == 1)
}

/// Enables a disabled endpoint again: its waiting calls go out now, each with a fresh
/// `give_up_after` of retries.
pub async fn enable(
    db: &PgPool,
    id: Uuid,
    give_up_after: std::time::Duration,
) -> anyhow::Result<Option<Endpoint>> {
    let mut tx = db.begin().await.context("Failed to begin")?;
    let endpoint: Option<Endpoint> = sqlx::query_as(concat!(
        "UPDATE webhook_endpoints SET disabled_at = NULL, disabled_reason = NULL, \
             failing_since = NULL WHERE id = $1 AND deleted_at IS NULL RETURNING ",
        endpoint_columns!()
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .context("Failed to enable a webhook endpoint")?;
    sqlx::query(
        "UPDATE webhook_deliveries SET next_attempt_at = now(), give_up_at = now() + $2, \
             attempts = 0, lease_until = NULL WHERE endpoint_id = $1 AND status = 'PENDING'",
    )
    .bind(id)
    .bind(give_up_after)
    .execute(&mut *tx)
    .await
    .context("Failed to wake a webhook endpoint's calls")?;
    tx.commit().await.context("Failed to commit")?;
    Ok(endpoint)
}

/// One call of an endpoint, as its delivery log shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = WebhookCall)]
pub struct Call {
    /// Also the `webhook-id` it is sent with (`msg_` and this id without dashes).
    pub id: Uuid,
    pub kind: String,
    pub event_type: String,
    pub status: String,
    pub attempts: i32,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
    pub give_up_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// An endpoint's calls, newest first.
pub async fn calls(
    db: &PgPool,
    endpoint: Uuid,
    status: Option<&str>,
    before: Option<Uuid>,
    limit: i64,
) -> anyhow::Result<Vec<Call>> {
    sqlx::query_as(
        "SELECT id, kind, event_type, status, attempts, last_status_code, last_error, \
             last_attempt_at, next_attempt_at, give_up_at, created_at, completed_at \
         FROM webhook_deliveries WHERE endpoint_id = $1 AND ($2::text IS NULL OR status = $2) \
           AND ($3::uuid IS NULL OR id < $3) \
         ORDER BY id DESC LIMIT $4",
    )
    .bind(endpoint)
    .bind(status)
    .bind(before)
    .bind(limit)
    .fetch_all(db)
    .await
    .context("Failed to list webhook calls")
}

/// The `webhook-id` a call is sent with.
pub fn webhook_id(call: Uuid) -> String {
    format!("msg_{}", call.simple())
}

#[cfg(test)]
mod tests {
    use super::is_public;

    #[test]
    fn only_public_addresses_are_public_however_they_are_written() {
        for private in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "240.0.0.1",
            "192.0.0.8",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:a00:1::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.215.14",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
