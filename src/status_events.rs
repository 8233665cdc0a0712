//! notification.status.events: one event each time a notification's overall status
//! changes (issue 15), for upstream services that follow a request as a whole rather than
//! each channel.
//!
//! The status announced is [`NotificationStatus::published`]: the overall status as the
//! delivery events tell it. A claim's PROCESSING stays internal there as it does on
//! notification.delivery.events (issue 14), so a notification goes PENDING (created) →
//! PROCESSING (some deliveries finished, others not) → COMPLETED, PARTIALLY_FAILED or
//! FAILED, and skips PROCESSING when its deliveries finish together. Every notification
//! gets a creation event and, once every delivery is finished, exactly one terminal event
//! (an operator's retry of a dead letter reopens it: PROCESSING again, then terminal again).
//!
//! Nothing is stored for it: each transition of a delivery ([`crate::deliveries`]) compares
//! the notification's status before and after its own changes, and writes an event through
//! the outbox in the same transaction when they differ. Transitions of one notification's
//! deliveries take turns on the notification's lock ([`changes`]), so two channels that
//! finish at the same moment cannot both miss the change, and the events of one
//! notification reach the outbox, then the topic (keyed by notification id), in order.
//! `version` grows with every change of any of its deliveries (it is the sum of their
//! versions), so a reader can ignore a stale or replayed event.

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    domain::{Channel, DeliveryStatus, Domain, NotificationStatus, UserId},
    intake::NewNotification,
    outbox::{DeliveryEvent, OutboxKind, OutboxMessage},
};

/// The seed of the advisory lock key of a notification's status transitions (the
/// projector's per-delivery locks use [`crate::read_model::projector::LOCK_SEED`]).
const LOCK_SEED: i64 = 0x5747;

/// The status topic, without prefix.
pub const STATUS_EVENTS_TOPIC: &str = "notification.status.events";

/// A notification's overall status, as published on notification.status.events.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusEvent {
    pub notification_id: Uuid,
    /// The upstream event it came from (none for an HTTP intake without one).
    pub event_id: Option<String>,
    pub event_type: String,
    pub domain: Domain,
    pub user_id: Option<i64>,
    pub status: NotificationStatus,
    /// The status announced before this one; none for the creation event.
    pub previous_status: Option<NotificationStatus>,
    /// Each delivery's state as its delivery events tell it.
    pub channels: Vec<ChannelState>,
    /// Grows with every change of the notification's deliveries.
    pub version: i64,
    pub changed_at: DateTime<Utc>,
}

/// One delivery in a status event's per-channel summary.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelState {
    pub channel: Channel,
    pub status: DeliveryStatus,
}

impl StatusEvent {
    /// The outbox message for this event (key: notification id, so one notification's
    /// events stay in order on one partition).
    pub fn to_outbox(&self, topic_prefix: &str) -> OutboxMessage {
        OutboxMessage {
            kind: OutboxKind::StatusEvent,
            topic: format!("{topic_prefix}{STATUS_EVENTS_TOPIC}"),
            key: Some(self.notification_id.to_string().into_bytes()),
            payload: serde_json::to_vec(self).expect("a status event serializes"),
            headers: BTreeMap::from([("X-Status".to_owned(), self.status.as_str().to_owned())]),
        }
    }
}

/// The creation event of a notification just stored: its first status (PENDING, or already
/// terminal when every delivery was SKIPPED).
pub fn created(n: &NewNotification, topic_prefix: &str) -> OutboxMessage {
    let channels: Vec<ChannelState> = n
        .deliveries
        .iter()
        .map(|d| ChannelState {
            channel: d.channel,
            status: d.status().published(),
        })
        .collect();
    StatusEvent {
        notification_id: n.id,
        event_id: n.draft.event_id.clone(),
        event_type: n.draft.event_type.to_string(),
        domain: n.draft.domain,
        user_id: n.draft.user_id.map(UserId::get),
        status: NotificationStatus::published(channels.iter().map(|c| c.status)),
        previous_status: None,
        version: channels.len() as i64,
        channels,
        changed_at: n.created_at,
    }
    .to_outbox(topic_prefix)
}

/// A delivery a transaction has just changed: its new delivery event, and the state its
/// last delivery event published (PENDING for a claimed delivery).
#[derive(Debug, Clone, Copy)]
pub struct Changed<'a> {
    /// Its notification's facts (id, eventId, type, domain, user) are the status event's,
    /// so the notification's row is not read again.
    pub event: &'a DeliveryEvent,
    pub before: DeliveryStatus,
}

/// A delivery of a notification being announced, as the transaction sees it.
#[derive(sqlx::FromRow)]
struct Sibling {
    notification_id: Uuid,
    delivery_id: Uuid,
    channel: Channel,
    status: DeliveryStatus,
    version: i64,
}

/// The status events of the notifications whose deliveries this transaction changed, for
/// those whose overall status changed; call it after the deliveries' updates and before the
/// outbox insert.
///
/// It first takes each notification's lock (in id order, so that two transactions cannot
/// deadlock), then reads every delivery of them in a statement of its own: under READ
/// COMMITTED that statement sees what a transaction which held the lock before committed,
/// so each transition compares against the one before it.
///
/// The lock is a transaction-level advisory lock on the notification id (seed
/// [`LOCK_SEED`]), not the row's: a row lock writes the tuple's header and a WAL record,
/// for every delivery recorded, on a row nothing else updates (issue 14). A collision of
/// two ids' 64-bit hashes only makes their transitions take turns. The notification's
/// facts come from the changed deliveries' events, which carry them: its row is not read.
pub async fn changes(
    conn: &mut PgConnection,
    changed: &[Changed<'_>],
    topic_prefix: &str,
) -> anyhow::Result<Vec<OutboxMessage>> {
    if changed.is_empty() {
        return Ok(Vec::new());
    }
    let notifications: BTreeMap<Uuid, &DeliveryEvent> = changed
        .iter()
        .map(|c| (c.event.notification_id, c.event))
        .collect();
    let ids: Vec<Uuid> = notifications.keys().copied().collect();
    crate::db::lock_ids_in_order(&mut *conn, &ids, LOCK_SEED)
        .await
        .context("Failed to lock notifications for their status")?;
    // One index lookup per notification. Written as a plain join, the planner chose a hash
    // join over a scan of both tables whenever its statistics lagged a fast-growing table,
    // which made this the most expensive statement of a backlog (11 ms a call against
    // 2.4 ms for the record itself). The LIMIT (a notification has at most one delivery
    // per channel) keeps the subquery from being flattened back into that join.
    let siblings: Vec<Sibling> = sqlx::query_as(
        "SELECT d.notification_id, d.delivery_id, d.channel, d.status, d.version \
         FROM UNNEST($1::uuid[]) WITH ORDINALITY AS n(id, position) \
         CROSS JOIN LATERAL ( \
             SELECT notification_id, id AS delivery_id, channel, status, version, created_at \
             FROM deliveries WHERE notification_id = n.id \
             ORDER BY created_at, channel LIMIT $2 \
         ) d \
         ORDER BY n.position, d.created_at, d.channel",
    )
    .bind(&ids)
    .bind(Channel::ALL.len() as i64)
    .fetch_all(&mut *conn)
    .await
    .context("Failed to read deliveries for their notification's status")?;
    let before: BTreeMap<Uuid, DeliveryStatus> = changed
        .iter()
        .map(|c| (c.event.delivery_id, c.before))
        .collect();
    let now = Utc::now();
    let mut events = Vec::new();
    for group in siblings.chunk_by(|a, b| a.notification_id == b.notification_id) {
        let after = NotificationStatus::published(group.iter().map(|d| d.status));
        let previous = NotificationStatus::published(
            group
                .iter()
                .map(|d| before.get(&d.delivery_id).copied().unwrap_or(d.status)),
        );
        if after == previous {
            continue;
        }
        let Some(notification) = notifications.get(&group[0].notification_id) else {
            continue;
        };
        let event = StatusEvent {
            notification_id: notification.notification_id,
            event_id: notification.event_id.clone(),
            event_type: notification.event_type.clone(),
            domain: notification.domain,
            user_id: notification.user_id,
            status: after,
            previous_status: Some(previous),
            channels: group
                .iter()
                .map(|d| ChannelState {
                    channel: d.channel,
                    status: d.status.published(),
                })
                .collect(),
            version: group.iter().map(|d| d.version).sum(),
            changed_at: now,
        };
        events.push(event.to_outbox(topic_prefix));
    }
    Ok(events)
}
