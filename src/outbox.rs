//! The transactional outbox: Kafka messages written in the same PostgreSQL transaction as
//! the state they describe, so that "committed" and "will be published" are one fact. The
//! relay publishes them afterwards, at least once.

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    db::PgQuery,
    domain::{Channel, DeliveryStatus, Domain},
    receipts::ReceiptState,
};

/// The delivery-state topic, without prefix.
pub const DELIVERY_EVENTS_TOPIC: &str = "notification.delivery.events";

/// What an outbox row carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    /// A delivery state change for notification.delivery.events.
    DeliveryEvent,
    /// A dead letter for notification.dlq.<domain>.
    DeadLetter,
    /// A broadcast's end for notification.broadcast.events.
    BroadcastEvent,
    /// A notification's overall status for notification.status.events.
    StatusEvent,
}

impl OutboxKind {
    fn as_str(self) -> &'static str {
        match self {
            OutboxKind::DeliveryEvent => "delivery_event",
            OutboxKind::DeadLetter => "dead_letter",
            OutboxKind::BroadcastEvent => "broadcast_event",
            OutboxKind::StatusEvent => "status_event",
        }
    }
}

/// One Kafka message waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub kind: OutboxKind,
    /// Full topic name, prefix included.
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// A delivery's state as published on notification.delivery.events. `version` grows with
/// every change of the delivery, so a reader can ignore stale or replayed events.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryEvent {
    pub delivery_id: Uuid,
    pub notification_id: Uuid,
    pub event_id: Option<String>,
    pub event_type: String,
    pub user_id: Option<i64>,
    pub domain: Domain,
    pub channel: Channel,
    pub status: DeliveryStatus,
    pub attempts: i32,
    pub error: Option<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// What the provider said became of the message, once it said so (issue 15).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt: Option<ReceiptState>,
    /// The dead letter an operator's replay made or re-queued this delivery from (issue 16).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayOrigin>,
    /// Why a PENDING delivery waits, and until when (issue 18).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldInfo>,
    /// The digest the delivery is a member of (issue 18).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_id: Option<Uuid>,
}

/// Why a PENDING delivery waits, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HoldInfo {
    pub reason: crate::timing::Hold,
    pub until: DateTime<Utc>,
}

/// Where a replayed delivery or message came from: the dead letter, and how many times it
/// had been replayed with this replay counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayOrigin {
    pub dead_letter_id: Uuid,
    pub replay_count: i32,
}

/// Headers a replayed message carries, and a dead letter made of it again passes on.
pub const REPLAY_OF_HEADER: &str = "X-Replay-Of";
/// See [`REPLAY_OF_HEADER`].
pub const REPLAY_COUNT_HEADER: &str = "X-Replay-Count";

impl ReplayOrigin {
    /// The origin a message's headers name, if both are there and readable.
    pub fn from_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<Self> {
        let (mut of, mut count) = (None, None);
        for (name, value) in headers {
            if name.eq_ignore_ascii_case(REPLAY_OF_HEADER) {
                of = value.parse().ok();
            } else if name.eq_ignore_ascii_case(REPLAY_COUNT_HEADER) {
                count = value.parse().ok();
            }
        }
        Some(ReplayOrigin {
            dead_letter_id: of?,
            replay_count: count?,
        })
    }

    /// The two headers.
    pub fn headers(&self) -> [(String, String); 2] {
        [
            (REPLAY_OF_HEADER.to_owned(), self.dead_letter_id.to_string()),
            (
                REPLAY_COUNT_HEADER.to_owned(),
                self.replay_count.to_string(),
            ),
        ]
    }
}

impl DeliveryEvent {
    /// The outbox message for this event (key: notification id, so one notification's
    /// deliveries stay in order on one partition).
    pub fn to_outbox(&self, topic_prefix: &str) -> OutboxMessage {
        OutboxMessage {
            kind: OutboxKind::DeliveryEvent,
            topic: format!("{topic_prefix}{DELIVERY_EVENTS_TOPIC}"),
            key: Some(self.notification_id.to_string().into_bytes()),
            payload: serde_json::to_vec(self).expect("a delivery event serializes"),
            headers: BTreeMap::new(),
        }
    }
}

/// The header that names a dead letter: a UUID given when the letter is made and written
/// with its outbox row, so every copy the relay publishes carries the same one. The DLQ
/// store keys on it; topic positions are not identities (they start again at 0 when a
/// topic is recreated).
pub const DEAD_LETTER_ID_HEADER: &str = "X-Dead-Letter-Id";

/// The header the relay adds to a dead letter whose payload it had to cut to get it past
/// Kafka's size limit; its value is the original payload's size in bytes.
pub const PAYLOAD_TRUNCATED_HEADER: &str = "X-Payload-Truncated";

/// The facts a dead letter carries in its headers (DESIGN §4).
#[derive(Debug, Clone, Default)]
pub struct DeadLetter {
    pub domain: Option<Domain>,
    pub error_message: String,
    pub error_class: String,
    pub retry_count: u32,
    pub failed_channel: Option<Channel>,
    pub original_topic: Option<String>,
    pub original_partition: Option<i32>,
    pub original_offset: Option<i64>,
    pub consumer_group: Option<String>,
    pub event_id: Option<String>,
    pub notification_id: Option<Uuid>,
    pub delivery_id: Option<Uuid>,
    pub failed_at: DateTime<Utc>,
    /// Set when what failed was an operator's replay: the letter then carries the origin on.
    pub replay: Option<ReplayOrigin>,
}

impl DeadLetter {
    /// The outbox message: the original bytes and key, with every header of DESIGN §4
    /// (empty where a fact does not apply, so readers find every header on every record)
    /// and a fresh [`DEAD_LETTER_ID_HEADER`].
    pub fn to_outbox(
        &self,
        topic_prefix: &str,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
    ) -> OutboxMessage {
        let domain = self.domain.unwrap_or(Domain::Api);
        let text = |v: Option<String>| v.unwrap_or_default();
        let mut headers = BTreeMap::from([
            // JSONB (the outbox's headers column) cannot hold NUL, and an error message may
            // quote a provider's answer.
            (
                "X-Error-Message".to_owned(),
                self.error_message.replace('\0', ""),
            ),
            ("X-Retry-Count".to_owned(), self.retry_count.to_string()),
            ("X-Error-Class".to_owned(), self.error_class.clone()),
            (
                "X-Failed-Channel".to_owned(),
                text(self.failed_channel.map(|c| c.to_string())),
            ),
            (
                "X-Original-Topic".to_owned(),
                text(self.original_topic.clone()),
            ),
            (
                "X-Original-Partition".to_owned(),
                text(self.original_partition.map(|p| p.to_string())),
            ),
            (
                "X-Original-Offset".to_owned(),
                text(self.original_offset.map(|o| o.to_string())),
            ),
            (
                "X-Consumer-Group".to_owned(),
                text(self.consumer_group.clone()),
            ),
            ("X-Event-Id".to_owned(), text(self.event_id.clone())),
            (
                "X-Notification-Id".to_owned(),
                text(self.notification_id.map(|n| n.to_string())),
            ),
            (
                "X-Delivery-Id".to_owned(),
                text(self.delivery_id.map(|d| d.to_string())),
            ),
            ("X-Failed-At".to_owned(), self.failed_at.to_rfc3339()),
            (DEAD_LETTER_ID_HEADER.to_owned(), Uuid::now_v7().to_string()),
        ]);
        headers.extend(self.replay.iter().flat_map(ReplayOrigin::headers));
        OutboxMessage {
            kind: OutboxKind::DeadLetter,
            topic: format!("{topic_prefix}{}", domain.dlq_topic()),
            key,
            payload,
            headers,
        }
    }
}

/// Writes the messages inside the caller's transaction, as one outbox row per topic: a
/// row's insert, its mark when published and its prune are paid once per transaction and
/// topic, not once per message (migration 0008). Messages keep their order within a topic.
pub async fn insert(conn: &mut PgConnection, messages: &[OutboxMessage]) -> anyhow::Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    // Gathered here rather than by the statement (as [`insert_sql`] does where only the
    // statement knows which messages to write): PostgreSQL then reads each row's arrays
    // and its headers' JSON once, instead of unnesting every message, sorting the messages
    // three times to aggregate them in order, and parsing each message's headers on its
    // own. That halved the statement's time in a record's transaction (BENCHMARKS.md).
    let mut rows: Vec<Row<'_>> = Vec::new();
    for m in messages {
        let at = match rows
            .iter()
            .position(|r| r.kind == m.kind && r.topic == m.topic)
        {
            Some(at) => at,
            None => {
                rows.push(Row {
                    kind: m.kind,
                    topic: &m.topic,
                    keys: Vec::new(),
                    payloads: Vec::new(),
                    headers: Vec::new(),
                });
                rows.len() - 1
            }
        };
        let row = &mut rows[at];
        row.keys.push(m.key.as_deref());
        row.payloads.push(&m.payload);
        row.headers.push(&m.headers);
    }
    let headers: Vec<String> = rows
        .iter()
        .map(|r| serde_json::to_string(&r.headers).expect("string headers serialize"))
        .collect();
    // One VALUES tuple per row, in the order their topics first appear (the rows' ids
    // follow it, and the relay publishes in id order).
    let values: Vec<String> = (0..rows.len())
        .map(|i| {
            let p = 5 * i;
            format!(
                "(${}, ${}, ${}::bytea[], ${}::bytea[], ${}::text::jsonb)",
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                p + 5
            )
        })
        .collect();
    let sql = format!(
        "INSERT INTO outbox (kind, topic, message_keys, payloads, headers) VALUES {}",
        values.join(", ")
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (row, headers) in rows.iter().zip(&headers) {
        query = query
            .bind(row.kind.as_str())
            .bind(row.topic)
            .bind(&row.keys)
            .bind(&row.payloads)
            .bind(headers);
    }
    query
        .execute(conn)
        .await
        .context("Failed to write to the outbox")?;
    Ok(())
}

/// The messages of one outbox row that [`insert`] writes: one kind, one topic.
struct Row<'a> {
    kind: OutboxKind,
    topic: &'a str,
    keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<&'a [u8]>,
    headers: Vec<&'a BTreeMap<String, String>>,
}

/// A statement that writes messages as [`insert`] does, for a larger statement that
/// decides which notifications are written: its parameters are numbered from `$first`, in
/// the order [`Columns::bind`] binds them, then one more, each message's notification id,
/// and only the messages whose notification is in `owners` (the name of a relation of
/// notification ids, a CTE of that statement) are written.
pub(crate) fn insert_sql(first: usize, owners: &str) -> String {
    let [kinds, topics, keys, payloads, headers, owner_ids] = std::array::from_fn(|i| first + i);
    format!(
        "INSERT INTO outbox (kind, topic, message_keys, payloads, headers) \
         SELECT kind, topic, array_agg(message_key ORDER BY n), array_agg(payload ORDER BY n), \
             jsonb_agg(headers::jsonb ORDER BY n) \
         FROM UNNEST(${kinds}::text[], ${topics}::text[], ${keys}::bytea[], ${payloads}::bytea[], \
             ${headers}::text[], ${owner_ids}::uuid[]) \
             WITH ORDINALITY AS t(kind, topic, message_key, payload, headers, notification_id, n) \
         WHERE notification_id IN (SELECT id FROM {owners}) GROUP BY kind, topic ORDER BY min(n)"
    )
}

/// Messages as the parameters of [`insert_sql`].
pub(crate) struct Columns<'a> {
    kinds: Vec<&'static str>,
    topics: Vec<&'a str>,
    keys: Vec<Option<&'a [u8]>>,
    payloads: Vec<&'a [u8]>,
    headers: Vec<String>,
}

impl<'a> Columns<'a> {
    /// Parameters [`Self::bind`] binds.
    pub(crate) const PARAMS: usize = 5;

    pub(crate) fn new(messages: impl IntoIterator<Item = &'a OutboxMessage>) -> Self {
        let mut columns = Columns {
            kinds: Vec::new(),
            topics: Vec::new(),
            keys: Vec::new(),
            payloads: Vec::new(),
            headers: Vec::new(),
        };
        for m in messages {
            columns.kinds.push(m.kind.as_str());
            columns.topics.push(&m.topic);
            columns.keys.push(m.key.as_deref());
            columns.payloads.push(&m.payload);
            columns
                .headers
                .push(serde_json::to_string(&m.headers).expect("string headers serialize"));
        }
        columns
    }

    /// Binds the columns, in the order of [`insert_sql`]'s parameters.
    pub(crate) fn bind<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        query
            .bind(&self.kinds)
            .bind(&self.topics)
            .bind(&self.keys)
            .bind(&self.payloads)
            .bind(&self.headers)
    }
}
