//! The write side shared by both intakes (the Kafka consumers and `POST
//! /api/v1/notifications`): a notification with one delivery per routed channel, each
//! PENDING or SKIPPED with its reason, and a delivery event per delivery in the outbox.
//! A PENDING delivery is due at once, or later with the reason ([`Hold`]): the caller's
//! `scheduledAt`, the user's quiet hours, or its digest's window ([`crate::timing`]).

pub mod writer;

use std::{collections::HashSet, sync::LazyLock, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use anyhow::Context;

use self::writer::{Claims, KeyClaim};
use crate::{
    config::Settings,
    directory::Contact,
    domain::{Channel, DeliveryStatus, Domain, EventType, Locale, Recipient, UserId},
    outbox::{self, DeliveryEvent, HoldInfo, OutboxMessage, ReplayOrigin},
    preferences::Preferences,
    routing::{self, Reach, RoutingTable, SendWindows},
    timing::{
        Hold,
        digest::{self, JoinRequest, Joined},
        quiet_hours,
    },
};

/// Where a notification came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Kafka,
    Api,
    Broadcast,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Kafka => "kafka",
            Source::Api => "api",
            Source::Broadcast => "broadcast",
        }
    }
}

/// The Kafka position a notification was read from.
#[derive(Debug, Clone)]
pub struct KafkaOrigin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A notification about to be stored: the draft it came from, resolved.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub id: Uuid,
    pub draft: Draft,
    /// The addresses after the recipient overrode the directory.
    pub reach: Reach,
    pub locale: Locale,
    pub created_at: DateTime<Utc>,
    pub deliveries: Vec<NewDelivery>,
    /// The user's quiet hours for this event type, in their time zone.
    pub windows: SendWindows,
    /// Set when the event type is digested: the digest's key and window.
    pub digest_rule: Option<(String, u32)>,
    /// The digest it joined, once stored ([`insert`]).
    pub digest: Option<Joined>,
}

/// One delivery about to be stored.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: Uuid,
    pub channel: Channel,
    pub address: Option<String>,
    /// `Some` makes the delivery SKIPPED.
    pub skip_reason: Option<String>,
    /// Quiet hours and digests apply to it (a user's channel, not an operator's).
    pub timed: bool,
}

impl NewDelivery {
    pub fn status(&self) -> DeliveryStatus {
        if self.skip_reason.is_some() {
            DeliveryStatus::Skipped
        } else {
            DeliveryStatus::Pending
        }
    }

    /// The digest a PENDING delivery of a user's channel is a member of.
    pub fn digest(&self, n: &NewNotification) -> Option<Uuid> {
        n.digest
            .filter(|_| self.timed && self.skip_reason.is_none())
            .map(|j| j.digest_id)
    }

    /// When a PENDING delivery is due, and why later than its notification's creation.
    pub fn schedule(&self, n: &NewNotification) -> (DateTime<Utc>, Option<Hold>) {
        let mut due = n.created_at;
        let mut hold = None;
        if self.skip_reason.is_some() {
            return (due, hold);
        }
        if let Some(at) = n.draft.scheduled_at.filter(|at| *at > n.created_at) {
            (due, hold) = (at, Some(Hold::Scheduled));
        }
        if !self.timed {
            return (due, hold);
        }
        if let Some(digest) = n.digest {
            (due, hold) = (due.max(digest.closes_at), Some(Hold::Digest));
        }
        if let Some(at) = quiet_hours::opening(
            &n.windows.quiet_hours,
            self.channel,
            n.windows.timezone,
            due,
        ) {
            (due, hold) = (at, Some(Hold::QuietHours));
        }
        (due, hold)
    }
}

/// What a notification needs besides its channels: who, in which language, with what.
#[derive(Debug, Clone)]
pub struct Draft {
    pub source: Source,
    pub domain: Domain,
    pub event_id: Option<String>,
    pub event_type: EventType,
    pub user_id: Option<UserId>,
    pub recipient: Recipient,
    pub data: Map<String, Value>,
    pub subject: Option<String>,
    pub body: Option<String>,
    pub raw_event: Option<Vec<u8>>,
    pub origin: Option<KafkaOrigin>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub scheduled_at: Option<DateTime<Utc>>,
    /// The broadcast this notification is one recipient of.
    pub broadcast_id: Option<Uuid>,
    /// The dead letter an operator's replay re-ingested this event from.
    pub replay: Option<ReplayOrigin>,
}

/// Which channels this Herald can send on: an unset endpoint disables a channel.
pub fn channel_enabled(settings: &Settings) -> impl Fn(Channel) -> bool + Send + Sync + 'static {
    let email = settings.smtp.url.is_some();
    let slack = settings.channels.slack_webhook_url.is_some();
    let sms = settings.channels.sms_gateway_url.is_some();
    let kakaotalk = settings.channels.kakaotalk_gateway_url.is_some();
    let push = settings.channels.push_gateway_url.is_some();
    move |channel| match channel {
        Channel::Email => email,
        Channel::Slack => slack,
        Channel::InApp => true,
        Channel::Sms => sms,
        Channel::Kakaotalk => kakaotalk,
        Channel::Push => push,
    }
}

/// Builds the notification: the recipient overrides the directory field by field, then
/// each channel is planned against preferences and addresses.
pub fn prepare(
    table: &RoutingTable,
    draft: Draft,
    channels: &[Channel],
    contact: Option<&Contact>,
    preferences: &Preferences,
    enabled: &dyn Fn(Channel) -> bool,
) -> NewNotification {
    let contact = contact.cloned().unwrap_or_default();
    let reach = Reach {
        user_id: draft.user_id,
        email: draft.recipient.email.clone().or(contact.email),
        phone: draft.recipient.phone.clone().or(contact.phone),
    };
    let locale = draft
        .recipient
        .locale
        .or(contact.locale)
        .unwrap_or(table.default_locale());
    let timezone = contact
        .timezone
        .as_ref()
        .and_then(|tz| tz.as_str().parse().ok());
    let windows = SendWindows::for_user(table, &draft.event_type, preferences, timezone);
    let policy = table.policy(&draft.event_type);
    // A broadcast is one message to many: it is never gathered into digests.
    let digest_rule = policy
        .digest
        .as_ref()
        // An event scheduled for later goes at its own time, not in a window that would
        // have to wait for it.
        .filter(|_| {
            draft.user_id.is_some()
                && draft.broadcast_id.is_none()
                && draft.subject.is_none()
                && draft.scheduled_at.is_none_or(|at| at <= Utc::now())
        })
        .map(|rule| (rule.key_of(&draft.data), rule.window_minutes));
    let deliveries = routing::plan(
        table,
        channels,
        &draft.event_type,
        &reach,
        preferences,
        enabled,
    )
    .into_iter()
    .map(|planned| NewDelivery {
        id: Uuid::now_v7(),
        channel: planned.channel,
        address: planned.address,
        skip_reason: planned.skip_reason,
        timed: !table.is_operator_channel(planned.channel),
    })
    .collect();
    NewNotification {
        id: Uuid::now_v7(),
        draft,
        reach,
        locale,
        created_at: Utc::now(),
        deliveries,
        windows,
        digest_rule,
        digest: None,
    }
}

impl NewNotification {
    /// The first delivery event (version 1) of each delivery.
    pub fn delivery_events(&self, topic_prefix: &str) -> Vec<OutboxMessage> {
        self.deliveries
            .iter()
            .map(|d| {
                let (until, hold) = d.schedule(self);
                DeliveryEvent {
                    delivery_id: d.id,
                    notification_id: self.id,
                    event_id: self.draft.event_id.clone(),
                    event_type: self.draft.event_type.to_string(),
                    user_id: self.draft.user_id.map(UserId::get),
                    domain: self.draft.domain,
                    channel: d.channel,
                    status: d.status(),
                    attempts: 0,
                    error: d.skip_reason.clone(),
                    hold: hold.map(|reason| HoldInfo { reason, until }),
                    digest_id: d.digest(self),
                    version: 1,
                    created_at: self.created_at,
                    updated_at: self.created_at,
                    receipt: None,
                    replay: self.draft.replay,
                }
                .to_outbox(topic_prefix)
            })
            .collect()
    }
}

/// Stores notifications, their deliveries, their delivery events and their first status
/// events inside the caller's transaction: one statement ([`insert_rows`]), after a second
/// one that joins digests when the batch has a digested event type ([`joins_digest`]).
/// Returns the notifications stored: a Kafka event already stored is left out (see
/// [`insert_rows`]).
pub async fn insert<'a>(
    conn: &mut PgConnection,
    notifications: &'a mut [NewNotification],
    topic_prefix: &str,
) -> anyhow::Result<Vec<&'a NewNotification>> {
    insert_claiming(conn, notifications, &[], Duration::ZERO, topic_prefix).await
}

/// [`insert`], claiming the HTTP intake's Idempotency-Keys in the same statement: `keys[i]`
/// is `notifications[i]`'s, if it has one, stored with the answer it replays (built from
/// the notification once its digest is joined). A notification whose key another request
/// holds, unexpired (stored before, or by a transaction this one waited for), is left out
/// with its deliveries and messages, and is missing from what this returns.
pub async fn insert_claiming<'a>(
    conn: &mut PgConnection,
    notifications: &'a mut [NewNotification],
    keys: &[Option<KeyClaim>],
    key_ttl: Duration,
    topic_prefix: &str,
) -> anyhow::Result<Vec<&'a NewNotification>> {
    join_digests(conn, notifications).await?;
    let notifications = &*notifications;
    // Delivery events first, then status events, as each topic's messages keep this order.
    let mut events: Vec<(Uuid, OutboxMessage)> = notifications
        .iter()
        .flat_map(|x| {
            x.delivery_events(topic_prefix)
                .into_iter()
                .map(|m| (x.id, m))
        })
        .collect();
    events.extend(
        notifications
            .iter()
            .map(|x| (x.id, crate::status_events::created(x, topic_prefix))),
    );
    let claims = Claims::new(notifications, keys, key_ttl)?;
    store_rows(conn, notifications, &events, claims.as_ref()).await
}

/// True when storing `notifications` joins a digest ([`insert`]'s first statement): with
/// none, [`insert`] is a single statement, atomic without a transaction of its own.
pub fn joins_digest(notifications: &[NewNotification]) -> bool {
    notifications.iter().any(joins_its_digest)
}

fn joins_its_digest(n: &NewNotification) -> bool {
    n.digest_rule.is_some()
        && n.draft.user_id.is_some()
        && n.deliveries
            .iter()
            .any(|d| d.timed && d.skip_reason.is_none())
}

/// Puts each notification of a digested event type with a delivery to send into its
/// user's open digest ([`digest::join`]), in the caller's transaction. Set afresh on every
/// call, so a batch written again after a refused transaction joins again.
async fn join_digests(
    conn: &mut PgConnection,
    notifications: &mut [NewNotification],
) -> anyhow::Result<()> {
    let requests: Vec<JoinRequest> = notifications
        .iter()
        .filter(|n| joins_its_digest(n))
        .filter_map(|n| {
            let (key, window_minutes) = n.digest_rule.clone()?;
            Some(JoinRequest {
                notification_id: n.id,
                user_id: n.draft.user_id?,
                event_type: n.draft.event_type.clone(),
                key,
                window_minutes,
            })
        })
        .collect();
    let joined = digest::join(conn, &requests).await?;
    for n in notifications.iter_mut() {
        n.digest = joined.get(&n.id).copied();
    }
    Ok(())
}

/// The channels the stored notifications have a delivery to send on: the caller wakes
/// their dispatchers once its transaction commits ([`crate::dispatch::wakeup`]).
pub fn due_channels(stored: &[&NewNotification]) -> std::collections::BTreeSet<Channel> {
    stored
        .iter()
        .flat_map(|x| &x.deliveries)
        .filter(|d| d.skip_reason.is_none())
        .map(|d| d.channel)
        .collect()
}

/// Stores the notification rows, their deliveries and `messages` (each with the id of the
/// notification it belongs to) in one statement, so that storing a batch costs one round
/// trip to PostgreSQL however many tables it writes, and is atomic on its own. Returns the
/// notifications stored. The benchmark's bare-INSERT ceiling calls it without messages.
///
/// A Kafka event whose notification is already stored (the same eventId read from the same
/// topic, by an earlier batch or another instance) is left out with its deliveries: the
/// unique index `notifications_kafka_event` is the consumers' idempotency record (DESIGN
/// §3), where a `processed_events` row per event used to be (migration 0009). A
/// transaction inserting an eventId another one holds uncommitted waits for it, then skips
/// the event if it committed; callers insert in eventId order so that two such
/// transactions cannot deadlock. The deliveries and messages of an event left out are left
/// out with it.
pub async fn insert_rows<'a>(
    conn: &mut PgConnection,
    notifications: &'a [NewNotification],
    messages: &[(Uuid, OutboxMessage)],
) -> anyhow::Result<Vec<&'a NewNotification>> {
    store_rows(conn, notifications, messages, None).await
}

/// [`insert_rows`], with `claims` claimed in the same statement ([`insert_claiming`]).
async fn store_rows<'a>(
    conn: &mut PgConnection,
    notifications: &'a [NewNotification],
    messages: &[(Uuid, OutboxMessage)],
    claims: Option<&Claims<'_>>,
) -> anyhow::Result<Vec<&'a NewNotification>> {
    if notifications.is_empty() {
        return Ok(Vec::new());
    }
    let n = notifications;
    let ids: Vec<Uuid> = n.iter().map(|x| x.id).collect();
    let sources: Vec<&str> = n.iter().map(|x| x.draft.source.as_str()).collect();
    let domains: Vec<&str> = n.iter().map(|x| x.draft.domain.as_str()).collect();
    let event_ids: Vec<Option<&str>> = n.iter().map(|x| x.draft.event_id.as_deref()).collect();
    let event_types: Vec<&str> = n.iter().map(|x| x.draft.event_type.as_str()).collect();
    let user_ids: Vec<Option<i64>> = n.iter().map(|x| x.draft.user_id.map(UserId::get)).collect();
    let recipients: Vec<String> = n
        .iter()
        .map(|x| {
            json!({
                "email": x.reach.email.as_ref().map(|e| e.as_str()),
                "phone": x.reach.phone.as_ref().map(|p| p.as_str()),
            })
            .to_string()
        })
        .collect();
    let locales: Vec<&str> = n.iter().map(|x| x.locale.as_str()).collect();
    let data: Vec<String> = n
        .iter()
        .map(|x| Value::Object(x.draft.data.clone()).to_string())
        .collect();
    let subjects: Vec<Option<&str>> = n.iter().map(|x| x.draft.subject.as_deref()).collect();
    let bodies: Vec<Option<&str>> = n.iter().map(|x| x.draft.body.as_deref()).collect();
    let raw: Vec<Option<&[u8]>> = n.iter().map(|x| x.draft.raw_event.as_deref()).collect();
    let topics: Vec<Option<&str>> = n
        .iter()
        .map(|x| x.draft.origin.as_ref().map(|o| o.topic.as_str()))
        .collect();
    let partitions: Vec<Option<i32>> = n
        .iter()
        .map(|x| x.draft.origin.as_ref().map(|o| o.partition))
        .collect();
    let offsets: Vec<Option<i64>> = n
        .iter()
        .map(|x| x.draft.origin.as_ref().map(|o| o.offset))
        .collect();
    let occurred: Vec<Option<DateTime<Utc>>> = n.iter().map(|x| x.draft.occurred_at).collect();
    let scheduled: Vec<Option<DateTime<Utc>>> = n.iter().map(|x| x.draft.scheduled_at).collect();
    let created: Vec<DateTime<Utc>> = n.iter().map(|x| x.created_at).collect();
    let broadcasts: Vec<Option<Uuid>> = n.iter().map(|x| x.draft.broadcast_id).collect();
    let deliveries = crate::deliveries::NewRows::new(n);
    let outbox = outbox::Columns::new(messages.iter().map(|(_, m)| m));
    let owners: Vec<Uuid> = messages.iter().map(|(id, _)| *id).collect();
    let sql = match claims {
        None => INSERT_ROWS.as_str(),
        Some(_) => INSERT_ROWS_CLAIMING.as_str(),
    };
    let query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .bind(&sources)
        .bind(&domains)
        .bind(&event_ids)
        .bind(&event_types)
        .bind(&user_ids)
        .bind(&recipients)
        .bind(&locales)
        .bind(&data)
        .bind(&subjects)
        .bind(&bodies)
        .bind(&raw)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&occurred)
        .bind(&scheduled)
        .bind(&created)
        .bind(&broadcasts);
    let query = outbox.bind(deliveries.bind(query)).bind(&owners);
    let query = match claims {
        None => query,
        Some(claims) => claims.bind(query),
    };
    let stored = query
        .fetch_all(&mut *conn)
        .await
        .context("Failed to store notifications")?;
    let stored = stored
        .iter()
        .map(|row| row.try_get::<Uuid, _>(0))
        .collect::<Result<HashSet<Uuid>, _>>()
        .context("Failed to read the notifications stored")?;
    deliveries.count_held(&stored);
    Ok(n.iter().filter(|x| stored.contains(&x.id)).collect())
}

/// Parameters of the notifications' part of [`INSERT_ROWS`].
const NOTIFICATION_PARAMS: usize = 19;

/// [`insert_rows`]' statement: the notifications a CTE inserts (`stored`: those not
/// already stored), then their deliveries and their messages.
static INSERT_ROWS: LazyLock<String> = LazyLock::new(|| insert_rows_sql(false));

/// [`INSERT_ROWS`] claiming Idempotency-Keys first ([`writer::claim_sql`]): the
/// notifications whose key is `taken` are not stored.
static INSERT_ROWS_CLAIMING: LazyLock<String> = LazyLock::new(|| insert_rows_sql(true));

fn insert_rows_sql(claiming: bool) -> String {
    let deliveries_from = NOTIFICATION_PARAMS + 1;
    let outbox_from = deliveries_from + crate::deliveries::NewRows::PARAMS;
    // The outbox's parameters end with each message's notification id.
    let claims_from = outbox_from + outbox::Columns::PARAMS + 1;
    let (claims, unclaimed) = if claiming {
        (
            format!("{}, ", writer::claim_sql(claims_from)),
            " WHERE t.id NOT IN (SELECT id FROM taken)",
        )
    } else {
        (String::new(), "")
    };
    format!(
        "WITH {claims}stored AS ( \
             INSERT INTO notifications (id, source, domain, event_id, event_type, user_id, \
                 recipient, locale, data, subject, body, raw_event, source_topic, \
                 source_partition, source_offset, occurred_at, scheduled_at, created_at, \
                 broadcast_id) \
             SELECT id, source, domain, event_id, event_type, user_id, recipient::jsonb, \
                 locale, data::jsonb, subject, body, raw_event, source_topic, \
                 source_partition, source_offset, occurred_at, scheduled_at, created_at, \
                 broadcast_id \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::int8[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], \
                 $12::bytea[], $13::text[], $14::int4[], $15::int8[], $16::timestamptz[], \
                 $17::timestamptz[], $18::timestamptz[], $19::uuid[]) \
             AS t(id, source, domain, event_id, event_type, user_id, recipient, locale, \
                 data, subject, body, raw_event, source_topic, source_partition, \
                 source_offset, occurred_at, scheduled_at, created_at, broadcast_id){unclaimed} \
             ON CONFLICT (source_topic, event_id) WHERE source = 'kafka' DO NOTHING \
             RETURNING id), \
         deliveries AS ({}), \
         messages AS ({}) \
         SELECT id FROM stored",
        crate::deliveries::insert_sql(deliveries_from, "stored"),
        outbox::insert_sql(outbox_from, "stored"),
    )
}

/// How often expired Idempotency-Keys are pruned.
pub const IDEMPOTENCY_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Forgets Idempotency-Keys older than `ttl`: the intake's stored answers are deleted, and
/// broadcasts keep their rows but lose the key. Lookups ignore expired keys already; this
/// keeps the table small. Returns how many keys were forgotten.
pub async fn prune_idempotency_keys(
    db: &sqlx::PgPool,
    ttl: std::time::Duration,
) -> anyhow::Result<u64> {
    // Locked in the order the intake's writers store keys in (bytewise), so that a batch
    // reusing expired keys and this delete cannot deadlock.
    let intake = sqlx::query(
        "DELETE FROM idempotency_keys WHERE (credential, idempotency_key) IN ( \
             SELECT credential, idempotency_key FROM idempotency_keys \
             WHERE created_at <= now() - $1 \
             ORDER BY credential COLLATE \"C\", idempotency_key COLLATE \"C\" FOR UPDATE)",
    )
    .bind(ttl)
    .execute(db)
    .await
    .context("Failed to prune idempotency keys")?;
    let broadcasts = sqlx::query(
        "UPDATE broadcasts SET idempotency_key = NULL, idempotency_credential = NULL \
         WHERE idempotency_key IS NOT NULL AND created_at <= now() - $1",
    )
    .bind(ttl)
    .execute(db)
    .await
    .context("Failed to expire broadcasts' idempotency keys")?;
    Ok(intake.rows_affected() + broadcasts.rows_affected())
}
