//! One batch of upstream messages into one transaction: the consumer's testable step.

use std::{collections::HashSet, sync::Arc};

use anyhow::Context;
use chrono::Utc;
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use super::decode::{self, Poison, PoisonClass};
pub use crate::kafka::consumer::IncomingMessage;
use crate::{
    db::is_data_error,
    directory,
    domain::{Channel, Domain, Event, UserId},
    event_schemas::EventSchemas,
    intake::{self, Draft, KafkaOrigin, NewNotification, Source},
    outbox::{self, DeadLetter, OutboxMessage, ReplayOrigin},
    preferences,
    routing::RoutingTable,
};

/// What a batch turned into.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// New notifications stored.
    pub accepted: usize,
    /// Events already stored from the same topic (or twice in this batch).
    pub duplicates: usize,
    /// Messages dead-lettered.
    pub poison: usize,
}

/// Everything a consumer needs to turn messages into rows. Cheap to clone.
#[derive(Clone)]
pub struct Ingestor {
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub routing: Arc<RoutingTable>,
    /// The data schema of each event type, checked before an event is accepted.
    pub schemas: Arc<EventSchemas>,
    pub channel_enabled: Arc<dyn Fn(Channel) -> bool + Send + Sync>,
    pub topic_prefix: String,
    /// Prefix of Redis keys.
    pub redis_prefix: String,
    pub max_event_bytes: usize,
    /// Woken after a commit that stored deliveries to send.
    pub wakeup: crate::dispatch::wakeup::Wakeup,
}

enum Decoded {
    Event {
        event: Event,
        channels: Vec<Channel>,
    },
    Poison(Poison),
}

impl Ingestor {
    /// Processes a batch in one transaction (or one statement). An `Err` means the database
    /// or the cache backend failed and the same batch should be stored again later: nothing
    /// was stored, or, when the connection was lost during the commit, perhaps all of it,
    /// which storing it again absorbs (the notifications' unique key). A message is never
    /// the cause of an `Err`.
    pub async fn process(
        &self,
        domain: Domain,
        consumer_group: &str,
        messages: &[IncomingMessage],
    ) -> anyhow::Result<BatchOutcome> {
        match self
            .process_together(domain, consumer_group, messages)
            .await
        {
            Err(error) if is_data_error(&error) => {
                // A value the database refuses would sink the whole batch for ever: find it
                // by storing the messages one at a time.
                tracing::warn!(
                    error = format!("{error:#}"),
                    "batch refused; retrying message by message"
                );
                let mut total = BatchOutcome::default();
                for message in messages {
                    let outcome = self.process_alone(domain, consumer_group, message).await?;
                    total.accepted += outcome.accepted;
                    total.duplicates += outcome.duplicates;
                    total.poison += outcome.poison;
                }
                Ok(total)
            }
            other => other,
        }
    }

    async fn process_alone(
        &self,
        domain: Domain,
        consumer_group: &str,
        message: &IncomingMessage,
    ) -> anyhow::Result<BatchOutcome> {
        let single = std::slice::from_ref(message);
        match self.process_together(domain, consumer_group, single).await {
            Err(error) if is_data_error(&error) => {
                let poison = Poison {
                    class: PoisonClass::InvalidField,
                    message: format!("the database refused the event: {}", root_cause(&error)),
                    event_id: None,
                };
                let letter = self.dead_letter(domain, consumer_group, message, &poison);
                let mut tx = self
                    .db
                    .begin()
                    .await
                    .context("Failed to begin a transaction")?;
                outbox::insert(&mut tx, &[letter]).await?;
                tx.commit()
                    .await
                    .context("Failed to commit a dead letter")?;
                count(domain, "poison", 1);
                Ok(BatchOutcome {
                    poison: 1,
                    ..BatchOutcome::default()
                })
            }
            other => other,
        }
    }

    async fn process_together(
        &self,
        domain: Domain,
        consumer_group: &str,
        messages: &[IncomingMessage],
    ) -> anyhow::Result<BatchOutcome> {
        let mut outcome = BatchOutcome::default();
        let decoded: Vec<Decoded> = messages
            .iter()
            .map(|m| self.decode(domain, &m.payload))
            .collect();

        // Same eventId twice in one batch: the first wins.
        let mut seen = HashSet::new();
        let mut users = HashSet::new();
        let mut keep = vec![false; messages.len()];
        for (i, d) in decoded.iter().enumerate() {
            if let Decoded::Event { event, .. } = d {
                if seen.insert(event.event_id.as_str()) {
                    keep[i] = true;
                    users.insert(event.user_id);
                } else {
                    outcome.duplicates += 1;
                }
            }
        }
        let users: Vec<UserId> = users.into_iter().collect();
        let (contacts, prefs) = tokio::try_join!(
            directory::load_many(&self.db, &users),
            preferences::load_many(&self.db, &self.redis, &self.redis_prefix, &users),
        )?;

        let mut drafts: Vec<NewNotification> = Vec::new();
        let mut letters: Vec<OutboxMessage> = Vec::new();
        for ((message, d), keep) in messages.iter().zip(decoded).zip(keep) {
            match d {
                Decoded::Poison(poison) => {
                    letters.push(self.dead_letter(domain, consumer_group, message, &poison));
                }
                Decoded::Event { event, channels } if keep => {
                    let user = event.user_id;
                    let draft = Draft {
                        source: Source::Kafka,
                        domain,
                        event_id: Some(event.event_id.as_str().to_owned()),
                        event_type: event.event_type,
                        user_id: Some(user),
                        recipient: event.recipient,
                        data: event.data,
                        subject: None,
                        body: None,
                        raw_event: Some(message.payload.clone()),
                        origin: Some(KafkaOrigin {
                            topic: message.topic.clone(),
                            partition: message.partition,
                            offset: message.offset,
                        }),
                        occurred_at: Some(event.occurred_at),
                        scheduled_at: None,
                        broadcast_id: None,
                        replay: ReplayOrigin::from_headers(
                            message
                                .headers
                                .iter()
                                .map(|(k, v)| (k.as_str(), v.as_str())),
                        ),
                    };
                    drafts.push(intake::prepare(
                        &self.routing,
                        draft,
                        &channels,
                        contacts.get(&user),
                        &prefs.get(&user).cloned().unwrap_or_default(),
                        &*self.channel_enabled,
                    ));
                }
                Decoded::Event { .. } => {}
            }
        }

        // In eventId order: two transactions holding the same events (lanes of one batch,
        // or two instances during a rebalance) then wait for each other in the same order
        // on the notifications' unique key and cannot deadlock.
        drafts.sort_by(|a, b| a.draft.event_id.cmp(&b.draft.event_id));
        // An event some earlier batch or another instance stored is left out here: the
        // notification's unique key on its topic and eventId is the idempotency record.
        let (accepted, due) = if letters.is_empty() && !intake::joins_digest(&drafts) {
            // The batch is then one statement, atomic on its own, so it goes without BEGIN
            // and COMMIT, two of its four round trips (as the HTTP intake's writer does). A
            // connection lost during it leaves unknown whether it committed, as a failed
            // COMMIT would: the batch is stored again, and the events it did store are
            // found by their unique key.
            let mut conn = self
                .db
                .acquire()
                .await
                .context("Failed to reach PostgreSQL")?;
            let stored = intake::insert(&mut conn, &mut drafts, &self.topic_prefix).await?;
            (stored.len(), intake::due_channels(&stored))
        } else {
            let mut tx = self
                .db
                .begin()
                .await
                .context("Failed to begin a transaction")?;
            let stored = intake::insert(&mut tx, &mut drafts, &self.topic_prefix).await?;
            let result = (stored.len(), intake::due_channels(&stored));
            outbox::insert(&mut tx, &letters).await?;
            tx.commit()
                .await
                .context("Failed to commit an ingest batch")?;
            result
        };
        self.wakeup.wake(due);

        outcome.duplicates += drafts.len() - accepted;
        outcome.accepted = accepted;
        outcome.poison = letters.len();
        count(domain, "accepted", outcome.accepted);
        count(domain, "duplicate", outcome.duplicates);
        count(domain, "poison", outcome.poison);
        Ok(outcome)
    }

    /// Whether `payload` would be accepted as an event of `domain` (decoded, routed, its data
    /// valid) without storing anything: what an operator's edit and a replay's dry run ask.
    pub fn check(&self, domain: Domain, payload: &[u8]) -> Result<(), Poison> {
        match self.decode(domain, payload) {
            Decoded::Event { .. } => Ok(()),
            Decoded::Poison(poison) => Err(poison),
        }
    }

    fn decode(&self, domain: Domain, payload: &[u8]) -> Decoded {
        let event = match decode::decode(payload, self.max_event_bytes) {
            Ok(event) => event,
            Err(poison) => return Decoded::Poison(poison),
        };
        match self.routing.channels(domain, &event.event_type) {
            Some(channels) => match self.schemas.check(event.event_type.as_str(), &event.data) {
                Ok(()) => Decoded::Event {
                    channels: channels.to_vec(),
                    event,
                },
                Err(violation) => Decoded::Poison(Poison {
                    class: PoisonClass::SchemaViolation,
                    message: violation.to_string(),
                    event_id: Some(event.event_id.as_str().to_owned()),
                }),
            },
            None => Decoded::Poison(Poison {
                class: PoisonClass::UnknownEventType,
                message: format!(
                    "eventType {} is not routed for the {domain} domain",
                    event.event_type
                ),
                event_id: Some(event.event_id.as_str().to_owned()),
            }),
        }
    }

    fn dead_letter(
        &self,
        domain: Domain,
        consumer_group: &str,
        message: &IncomingMessage,
        poison: &Poison,
    ) -> OutboxMessage {
        tracing::warn!(
            %domain,
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            class = poison.class.as_str(),
            reason = %poison.message,
            "poison message dead-lettered"
        );
        DeadLetter {
            domain: Some(domain),
            error_message: poison.message.clone(),
            error_class: poison.class.as_str().to_owned(),
            retry_count: 0,
            failed_channel: None,
            original_topic: Some(message.topic.clone()),
            original_partition: Some(message.partition),
            original_offset: Some(message.offset),
            consumer_group: Some(consumer_group.to_owned()),
            event_id: poison.event_id.clone(),
            notification_id: None,
            delivery_id: None,
            failed_at: Utc::now(),
            replay: ReplayOrigin::from_headers(
                message
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            ),
        }
        .to_outbox(
            &self.topic_prefix,
            message.key.clone(),
            message.payload.clone(),
        )
    }
}

fn count(domain: Domain, outcome: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!("herald_ingest_events_total", "domain" => domain.as_str(), "outcome" => outcome)
            .increment(n as u64);
    }
}

fn root_cause(error: &anyhow::Error) -> String {
    error.root_cause().to_string()
}
