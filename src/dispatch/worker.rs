//! The dispatcher's steps: claim due deliveries of one channel, send one, record the
//! outcome. Each step is one function the loops in `dispatch::run` call, and tests can
//! drive directly.

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde_json::json;
use sqlx::{Acquire, PgPool, Postgres, Transaction};
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    circuit_breaker::{CircuitBreaker, Permit, Transition},
    rate_limit::{Admission, RateLimiter},
    record::{self, Finished, Recorder, Written},
    send_speed::{Change, SendSpeed},
};
pub use crate::deliveries::Job;
use crate::{
    channels::{Content, Outgoing, Retry, SendError, Senders},
    config::DispatchSettings,
    db::{is_data_error, is_lost_race},
    deliveries,
    domain::{Channel, DeliveryStatus, EventType, UserId},
    outbox::{DeadLetter, OutboxMessage},
    preferences,
    routing::RoutingTable,
    routing::WhenCapped,
    suppressions,
    templates::{ADHOC, DIGEST_SUFFIX, Templates},
    timing::{
        Hold,
        frequency_cap::{FrequencyCaps, Verdict},
    },
};

/// The skip reason of a send over a frequency cap of a type whose capped sends are dropped.
pub const FREQUENCY_CAPPED: &str = "frequency_capped";

/// What happened to one claimed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Failed, will be tried again at the given time.
    Retrying,
    /// Failed for good; dead-lettered.
    Failed,
    /// Not attempted now (rate limit, open breaker); back to PENDING, no attempt counted.
    Deferred,
    /// Another worker owns the delivery now (our lease ran out); nothing recorded.
    LeaseLost,
    /// SKIPPED without an attempt: its address is suppressed, or it is over a frequency
    /// cap of an event type whose capped sends are dropped.
    Skipped,
}

/// One send to a provider: its result, when it started and how long it took.
struct Attempt {
    result: Result<crate::channels::Receipt, SendError>,
    started_at: DateTime<Utc>,
    latency: Duration,
}

/// A delivery cleared to go out now.
#[derive(Debug, Clone, Copy)]
pub struct Admitted {
    /// The delivery's own channel.
    pub channel: Channel,
    /// The channel it goes out on (a fallback while `channel`'s breaker is open).
    pub via: Channel,
    /// It is the breaker's half-open probe.
    pub probing: bool,
}

/// Everything the dispatcher needs. Shared by the channel loops.
pub struct Dispatcher {
    pub db: PgPool,
    pub senders: Senders,
    pub templates: Arc<Templates>,
    pub limiter: RateLimiter,
    pub breakers: HashMap<Channel, CircuitBreaker>,
    /// How long each channel's sends take, which says whether they may go out inside the
    /// transaction that finds them ([`Self::sends_in_claim`]).
    pub speeds: HashMap<Channel, SendSpeed>,
    pub settings: DispatchSettings,
    /// Fraction of each channel's concurrency that broadcast deliveries may take.
    pub broadcast_share: f64,
    pub topic_prefix: String,
    /// Announces breaker changes on the ops Slack channel, when one is configured.
    pub announcer: Option<Arc<dyn Fn(String) + Send + Sync>>,
    /// Writes finished sends in batches.
    pub recorder: Recorder,
    /// Where user preferences are cached: a fallback channel must be one the user accepts.
    pub redis: ConnectionManager,
    pub redis_prefix: String,
    /// Says which channels are operators' (preferences do not apply to them).
    pub routing: Arc<RoutingTable>,
    /// What the channel loops wait on for new due deliveries.
    pub wakeup: super::wakeup::Wakeup,
    /// Per-user frequency caps ([`crate::timing::frequency_cap`]).
    pub caps: FrequencyCaps,
    /// The gateway channels polled for receipts ([`crate::receipts::poll`]), and how: the
    /// first wait and the deadline.
    pub receipt_polls: ReceiptPolls,
}

/// Which channels' sends are polled for receipts, and when.
#[derive(Debug, Clone, Default)]
pub struct ReceiptPolls {
    pub channels: std::collections::BTreeSet<Channel>,
    pub first_wait: Duration,
    pub deadline: Duration,
}

impl Dispatcher {
    /// Broadcast sends `channel` may have in flight: the configured share of its
    /// concurrency, at least one.
    pub fn broadcast_concurrency(&self, channel: Channel) -> usize {
        let concurrency = self.settings.concurrency_of(channel);
        ((concurrency as f64 * self.broadcast_share).floor() as usize).max(1)
    }

    /// Builds the breakers for every channel.
    pub fn breakers(settings: &DispatchSettings) -> HashMap<Channel, CircuitBreaker> {
        Channel::ALL
            .into_iter()
            .map(|c| {
                (
                    c,
                    CircuitBreaker::new(settings.breaker_threshold, settings.breaker_cooldown),
                )
            })
            .collect()
    }

    /// Every channel's send speed, none measured yet.
    pub fn speeds(settings: &DispatchSettings) -> HashMap<Channel, SendSpeed> {
        Channel::ALL
            .into_iter()
            .map(|c| {
                let speed = if c == Channel::InApp {
                    SendSpeed::always()
                } else {
                    SendSpeed::new(settings.quick_send)
                };
                (c, speed)
            })
            .collect()
    }

    /// Claims up to `limit` due deliveries of `channel` (see [`deliveries::claim`]), from
    /// where `cursor` says; with `locking`, only those [`Self::lock_due`] leaves.
    pub async fn claim(
        &self,
        channel: Channel,
        (limit, broadcast_limit): (usize, usize),
        locking: bool,
        cursor: &mut deliveries::Cursor,
    ) -> anyhow::Result<Vec<Job>> {
        deliveries::claim(
            &self.db,
            channel,
            (limit, broadcast_limit),
            self.settings.lease,
            (locking, self.routing.has_digests()),
            cursor,
        )
        .await
    }

    /// Decides whether a claimed delivery goes out now and on which channel (circuit
    /// breaker, fallback, rate limit), or defers it. The channel loops run this in turn
    /// for each claimed delivery before sending them concurrently, so the rate-limit
    /// window they read before claiming already counts the sends they started.
    pub async fn admit(&self, job: &Job) -> anyhow::Result<Result<Admitted, Outcome>> {
        let channel = job.channel;
        if job.suppressed {
            return Ok(Err(self
                .skip(job, suppressions::SKIP_REASON, "suppressed")
                .await?));
        }
        // A reclaim counts the attempt its dead worker may have made: a delivery whose
        // workers keep dying ends in the DLQ instead of being sent again and again.
        if (job.attempts - job.retry_base) as u32 > self.settings.max_retries {
            let error = SendError::permanent(
                "lease_expired",
                "its workers stopped before recording the outcome, more often than retries allow",
            );
            // Recorded as the lost attempt itself, not as one more.
            let lost = Job {
                attempts: job.attempts - 1,
                members: job
                    .members
                    .iter()
                    .map(|m| Job {
                        attempts: m.attempts - 1,
                        ..m.clone()
                    })
                    .collect(),
                ..job.clone()
            };
            let outcome = self
                .finish(
                    &lost,
                    channel,
                    Attempt {
                        result: Err(error),
                        started_at: Utc::now(),
                        latency: Duration::ZERO,
                    },
                )
                .await?;
            return Ok(Err(outcome));
        }
        if let Some(outcome) = self.cap(job).await? {
            return Ok(Err(outcome));
        }
        let (via, breaker_permit) = match self.breakers[&channel].permit() {
            Permit::Refuse(wait) => match self.accepted_fallback(job, channel).await? {
                Some(fallback) => (fallback, self.breakers[&fallback].permit()),
                None => return Ok(Err(self.defer(job, wait, Hold::CircuitOpen).await?)),
            },
            permit => (channel, permit),
        };
        if let Permit::Refuse(wait) = breaker_permit {
            return Ok(Err(self.defer(job, wait, Hold::CircuitOpen).await?));
        }
        let probing = breaker_permit == Permit::Probe;
        if let Some(limit) = self.settings.rate_limits.get(&via).copied() {
            let token = format!("{}:{}", job.delivery_id, Uuid::new_v4());
            if let Admission::Wait(wait) = self.limiter.admit(via, limit, &token).await {
                if probing {
                    self.breakers[&via].release_probe();
                }
                metrics::counter!("herald_rate_limited_total", "channel" => via.as_str())
                    .increment(1);
                return Ok(Err(self.defer(job, wait, Hold::RateLimited).await?));
            }
        }
        Ok(Ok(Admitted {
            channel,
            via,
            probing,
        }))
    }

    /// Applies the user's frequency caps to a delivery about to go out: `None` to go on,
    /// else what became of it (deferred until the cap has room, or SKIPPED for an event
    /// type whose capped sends are dropped). Critical event types and operator channels
    /// are never capped.
    async fn cap(&self, job: &Job) -> anyhow::Result<Option<Outcome>> {
        let channel = job.channel;
        if !self.caps.covers(channel) || self.routing.is_operator_channel(channel) {
            return Ok(None);
        }
        let (Some(user), Ok(event_type)) = (
            job.user_id.and_then(|u| UserId::new(u).ok()),
            EventType::parse(&job.event_type),
        ) else {
            return Ok(None);
        };
        let policy = self.routing.policy(&event_type);
        if policy.critical {
            return Ok(None);
        }
        let Verdict::Capped(wait) = self
            .caps
            .check(user, channel, &event_type, job.delivery_id)
            .await
        else {
            return Ok(None);
        };
        let action = match policy.when_capped {
            WhenCapped::Defer => "deferred",
            WhenCapped::Skip => "skipped",
        };
        metrics::counter!("herald_frequency_capped_total", "channel" => channel.as_str(), "action" => action)
            .increment(1);
        Ok(Some(match policy.when_capped {
            WhenCapped::Defer => self.defer(job, wait, Hold::FrequencyCapped).await?,
            WhenCapped::Skip => self.skip(job, FREQUENCY_CAPPED, "frequency_capped").await?,
        }))
    }

    /// Sends an admitted delivery and records the outcome.
    pub async fn send(&self, job: &Job, admitted: Admitted) -> anyhow::Result<Outcome> {
        let attempt = self
            .attempt(job, admitted, self.settings.send_timeout)
            .await;
        self.finish(job, admitted.via, attempt).await
    }

    /// Whether `channel`'s due deliveries go out inside the transaction that finds them
    /// ([`Self::send_locked`]) rather than under a claim's lease: IN_APP, whose send is one
    /// Redis PUBLISH, and any other channel while its sends are quick
    /// ([`super::send_speed`]), so that the transaction stays open for milliseconds; and
    /// only while nothing may stop a send (no rate limit or frequency cap on the channel,
    /// its breaker closed), since a deferral writes in a transaction of its own.
    pub fn sends_in_claim(&self, channel: Channel) -> bool {
        self.speeds[&channel].is_quick()
            && !self.settings.rate_limits.contains_key(&channel)
            && !self.caps.covers(channel)
            && self.breakers[&channel].is_closed()
    }

    /// Locks up to `limit` due deliveries of `channel` (of which at most `broadcast_limit`
    /// of broadcasts) for [`Self::send_locked`], from where `cursor` says; `None` when none
    /// is due ([`deliveries::lock_due`]).
    pub async fn lock_due(
        &self,
        channel: Channel,
        (limit, broadcast_limit): (usize, usize),
        cursor: &mut deliveries::Cursor,
    ) -> anyhow::Result<Option<(Transaction<'static, Postgres>, Vec<Job>)>> {
        let mut tx = self.db.begin().await.context("Failed to begin")?;
        let jobs = deliveries::lock_due(&mut tx, channel, limit, broadcast_limit, cursor).await?;
        Ok((!jobs.is_empty()).then_some((tx, jobs)))
    }

    /// Sends deliveries [`Self::lock_due`] locked, all at once, and records their outcomes
    /// in the transaction that holds them, which then commits: one row version and one
    /// commit per delivery fewer than a claim, a send and a record (issue 14). A delivery
    /// to a suppressed address is SKIPPED in the same record.
    ///
    /// Should the record fail for good, the deliveries were sent but are still PENDING and
    /// due: they are put under a lease instead, in a transaction of their own, as if their
    /// worker had died, so that they are not sent again at once and one that keeps failing
    /// ends in the DLQ ([`Self::admit`]).
    pub async fn send_locked(
        &self,
        tx: Transaction<'static, Postgres>,
        jobs: Vec<Job>,
    ) -> anyhow::Result<()> {
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.delivery_id).collect();
        // A send the receiver got must be an attempt Herald counts, even if this
        // transaction dies after it: a quick channel's sends are marked first, in a row
        // committed on its own (`deliveries::mark_sends`). IN_APP's are not: its message
        // is the inbox row this transaction writes, and the live stream's PUBLISH names
        // the delivery, which goes out again under the same id.
        let mark = if jobs.iter().any(|j| j.channel != Channel::InApp) {
            match deliveries::mark_sends(&self.db, &ids).await {
                Ok(mark) => Some(mark),
                Err(error) => {
                    // Nothing was sent: the deliveries are due again once the locks go.
                    let _ = tx.rollback().await;
                    return Err(error);
                }
            }
        } else {
            None
        };
        let (records, written) = match self.send_and_record_locked(tx, &jobs, mark).await {
            Ok(done) => done,
            Err(error) => {
                let mut conn = self.db.acquire().await.context("Failed to connect")?;
                deliveries::lease_locked(&mut conn, &ids, self.settings.lease).await?;
                // Their reclaim, when the lease runs out, counts the attempt.
                if let Some(mark) = mark {
                    deliveries::unmark_sends(&mut conn, mark).await?;
                }
                return Err(error);
            }
        };
        for ((job, record), written) in jobs.iter().zip(records).zip(written) {
            if job.suppressed {
                count_skip(job, "suppressed", written);
            } else {
                self.count(job, record.event.status, written);
            }
        }
        Ok(())
    }

    /// [`Self::send_locked`]'s sends and record; the transaction is rolled back (and its
    /// locks gone) when this fails.
    async fn send_and_record_locked(
        &self,
        mut tx: Transaction<'static, Postgres>,
        jobs: &[Job],
        mark: Option<i64>,
    ) -> anyhow::Result<(Vec<Finished>, Vec<Written>)> {
        let attempts = futures_util::future::join_all(jobs.iter().map(|job| async move {
            if job.suppressed {
                return None;
            }
            let admitted = Admitted {
                channel: job.channel,
                via: job.channel,
                probing: false,
            };
            Some(self.attempt(job, admitted, LOCKED_SEND_TIMEOUT).await)
        }))
        .await;
        let records: Vec<Finished> = jobs
            .iter()
            .zip(attempts)
            .map(|(job, attempt)| match attempt {
                Some(attempt) => self.finished(job, job.channel, attempt),
                None => skipped(job, suppressions::SKIP_REASON),
            })
            .collect();
        let written = match record_locked(&mut tx, &self.topic_prefix, &records).await {
            // A value PostgreSQL refuses sinks the batch: each record on its own, so that
            // only its own delivery goes under a lease.
            Err(error) if is_data_error(&error) => {
                tracing::warn!(
                    records = records.len(),
                    error = format!("{error:#}"),
                    "a batch of send records was refused; writing them one by one"
                );
                let mut written = Vec::with_capacity(records.len());
                for record in &records {
                    let one = std::slice::from_ref(record);
                    match record_locked(&mut tx, &self.topic_prefix, one).await {
                        Ok(one) => written.push(one[0]),
                        Err(error) if is_data_error(&error) => {
                            tracing::error!(delivery = %record.event.delivery_id, error = format!("{error:#}"), "cannot record a delivery");
                            deliveries::lease_locked(
                                &mut tx,
                                &[record.event.delivery_id],
                                self.settings.lease,
                            )
                            .await?;
                            written.push(Written::LeaseLost);
                        }
                        Err(error) => return Err(rolled_back(tx, error).await),
                    }
                }
                written
            }
            Err(error) => return Err(rolled_back(tx, error).await),
            Ok(written) => written,
        };
        if let Some(mark) = mark
            && let Err(error) = deliveries::unmark_sends(&mut tx, mark).await
        {
            return Err(rolled_back(tx, error).await);
        }
        tx.commit().await.context("Failed to commit send records")?;
        Ok((records, written))
    }

    /// Sends an admitted delivery, giving up after `timeout`.
    async fn attempt(&self, job: &Job, admitted: Admitted, timeout: Duration) -> Attempt {
        let Admitted {
            channel,
            via,
            probing,
        } = admitted;
        let started_at = Utc::now();
        let clock = Instant::now();
        let mut contacted = false;
        let result = match self.prepare(job, channel, via) {
            Ok(message) => {
                contacted = true;
                let sender = &self.senders[&via];
                match tokio::time::timeout(timeout, sender.send(&message)).await {
                    Ok(result) => result,
                    Err(_) => Err(SendError::retryable(
                        "timeout",
                        format!("no answer within {timeout:?}"),
                    )),
                }
            }
            Err(error) => Err(error),
        };
        let latency = clock.elapsed();
        metrics::histogram!("herald_send_duration_seconds", "channel" => via.as_str())
            .record(latency.as_secs_f64());
        // Only sends that reached the provider tell the breaker anything, and only
        // retryable failures say the channel is unwell.
        if contacted {
            let speed = &self.speeds[&via];
            match speed.record(latency) {
                Some(Change::Quick) => tracing::info!(
                    channel = %via,
                    average_ms = speed.average().as_secs_f64() * 1e3,
                    "the channel's sends are quick: sending them inside the transactions that find them"
                ),
                Some(Change::Slow) => tracing::info!(
                    channel = %via,
                    average_ms = speed.average().as_secs_f64() * 1e3,
                    "the channel's sends slowed down: claiming them under a lease again"
                ),
                None => {}
            }
            metrics::gauge!("herald_dispatch_sends_in_transaction", "channel" => via.as_str())
                .set(if speed.is_quick() { 1.0 } else { 0.0 });
            let unwell = matches!(&result, Err(e) if e.retry == Retry::Retryable);
            if let Some(transition) = self.breakers[&via].record(unwell) {
                self.announce(via, transition);
            }
        } else if probing {
            self.breakers[&via].release_probe();
        }
        metrics::gauge!("herald_circuit_state", "channel" => via.as_str())
            .set(self.breakers[&via].gauge());
        Attempt {
            result,
            started_at,
            latency,
        }
    }

    /// True when the channel's deliveries can go out elsewhere while its breaker is open.
    pub fn has_fallback(&self, channel: Channel) -> bool {
        self.fallback_for(channel).is_some()
    }

    /// The fallback of `channel` if the delivery's user accepts it for this event type. A
    /// user who opted out of SMS does not get SMS because KakaoTalk's breaker is open: the
    /// delivery waits as it would with no fallback configured.
    async fn accepted_fallback(
        &self,
        job: &Job,
        channel: Channel,
    ) -> anyhow::Result<Option<Channel>> {
        let Some(fallback) = self.fallback_for(channel) else {
            return Ok(None);
        };
        let Some(user) = job.user_id.and_then(|u| UserId::new(u).ok()) else {
            return Ok(Some(fallback));
        };
        if self.routing.is_operator_channel(fallback) {
            return Ok(Some(fallback));
        }
        let preferences =
            preferences::load(&self.db, &self.redis, &self.redis_prefix, user).await?;
        let accepted = match EventType::parse(&job.event_type) {
            Ok(event_type) => preferences.allows(fallback, &event_type),
            Err(_) => preferences.channels.get(&fallback).copied().unwrap_or(true),
        };
        if !accepted {
            metrics::counter!("herald_fallback_opted_out_total", "channel" => fallback.as_str())
                .increment(1);
            tracing::debug!(delivery = %job.delivery_id, %fallback, "the user opted out of the fallback channel");
        }
        Ok(accepted.then_some(fallback))
    }

    fn fallback_for(&self, channel: Channel) -> Option<Channel> {
        self.settings
            .fallbacks
            .get(&channel)
            .copied()
            .filter(|f| self.senders.contains_key(f))
    }

    /// Renders the content for the channel it goes out on, and finds the address there.
    fn prepare(&self, job: &Job, channel: Channel, via: Channel) -> Result<Outgoing, SendError> {
        let locale = job.locale;
        let digest_folder;
        let folder = if job.subject.is_some() {
            ADHOC
        } else if !job.members.is_empty() {
            // A digest of one reads like the event's own message; of more, it lists them.
            digest_folder = format!("{}{DIGEST_SUFFIX}", job.event_type);
            digest_folder.as_str()
        } else {
            job.event_type.as_str()
        };
        let mut context = tera::Context::new();
        if !job.members.is_empty() {
            let events: Vec<serde_json::Value> = std::iter::once(job)
                .chain(&job.members)
                .map(|m| {
                    json!({
                        "event_id": m.event_id,
                        "notification_id": m.notification_id,
                        "occurred_at": m.occurred_at.unwrap_or(m.created_at).to_rfc3339(),
                        "data": m.data,
                    })
                })
                .collect();
            context.insert("count", &events.len());
            context.insert("events", &events);
        }
        context.insert("data", &job.data);
        context.insert("locale", locale.as_str());
        context.insert("event_type", &job.event_type);
        context.insert("event_id", &job.event_id.clone().unwrap_or_default());
        context.insert("notification_id", &job.notification_id.to_string());
        context.insert("delivery_id", &job.delivery_id.to_string());
        context.insert("user_id", &job.user_id);
        context.insert(
            "occurred_at",
            &job.occurred_at.unwrap_or(job.created_at).to_rfc3339(),
        );
        context.insert("recipient", &job.recipient);
        context.insert("subject", &job.subject.clone().unwrap_or_default());
        context.insert("body", &job.body.clone().unwrap_or_default());
        let template_error =
            |e: crate::templates::RenderError| SendError::permanent("template", e.to_string());
        let content = match via {
            Channel::Email => Content::Email(
                self.templates
                    .email(locale, folder, &context)
                    .map_err(template_error)?,
            ),
            Channel::Slack => Content::Slack(
                self.templates
                    .slack_body(locale, folder, &context)
                    .map_err(template_error)?,
            ),
            _ => Content::Short(
                self.templates
                    .short(locale, folder, &context)
                    .map_err(template_error)?,
            ),
        };
        let address = if via == channel {
            job.address.clone()
        } else {
            match via {
                Channel::Email => job.recipient["email"].as_str().map(str::to_owned),
                Channel::Sms | Channel::Kakaotalk => {
                    job.recipient["phone"].as_str().map(str::to_owned)
                }
                Channel::Slack => Some("ops".to_owned()),
                Channel::InApp | Channel::Push => job.user_id.map(|u| format!("user:{u}")),
            }
        }
        .ok_or_else(|| SendError::permanent("address", format!("no address for {via}")))?;
        Ok(Outgoing {
            delivery_id: job.delivery_id,
            notification_id: job.notification_id,
            user_id: job.user_id,
            event_type: job.event_type.clone(),
            locale,
            address,
            content,
        })
    }

    /// Puts a delivery back to PENDING for later without counting an attempt.
    async fn defer(&self, job: &Job, wait: Duration, hold: Hold) -> anyhow::Result<Outcome> {
        let channel = job.channel.as_str();
        metrics::counter!("herald_deliveries_total", "channel" => channel.to_owned(), "outcome" => "deferred")
            .increment(1);
        metrics::counter!("herald_deliveries_held_total", "channel" => channel.to_owned(), "reason" => hold.as_str())
            .increment(1);
        tracing::debug!(delivery = %job.delivery_id, ?wait, reason = hold.as_str(), "delivery deferred");
        if deliveries::defer(&self.db, job, wait, hold, &self.topic_prefix).await? {
            Ok(Outcome::Deferred)
        } else {
            Ok(Outcome::LeaseLost)
        }
    }

    /// Records an attempt and moves the delivery to SUCCESS, back to PENDING for a retry, or
    /// to FAILED with a dead letter, all in one transaction (shared with other sends'
    /// records: see [`super::record`]).
    async fn finish(&self, job: &Job, via: Channel, attempt: Attempt) -> anyhow::Result<Outcome> {
        let finished = self.finished(job, via, attempt);
        let status = finished.event.status;
        let written = self.write(job, finished).await?;
        Ok(self.count(job, status, written))
    }

    /// The record of an attempt: the delivery's next state (SUCCESS, PENDING for a retry
    /// with its backoff, or FAILED with its dead letter), its event and the attempt, sent
    /// on `via` (the delivery's own channel, or its fallback).
    fn finished(&self, job: &Job, via: Channel, attempt: Attempt) -> Finished {
        let channel = job.channel;
        let Attempt {
            result,
            started_at,
            latency,
        } = attempt;
        let attempt = job.attempts + 1;
        let retries_made = attempt - 1 - job.retry_base;
        let (outcome_label, status) = match &result {
            Ok(_) => ("SUCCESS", DeliveryStatus::Success),
            Err(e)
                if e.retry == Retry::Retryable
                    && (retries_made as u32) < self.settings.max_retries =>
            {
                ("RETRYABLE", DeliveryStatus::Pending)
            }
            Err(e) if e.retry == Retry::Retryable => ("RETRYABLE", DeliveryStatus::Failed),
            Err(_) => ("PERMANENT", DeliveryStatus::Failed),
        };
        let error = result.as_ref().err();
        // A retryable failure with no retries left is dead-lettered as `retries_exhausted`.
        let class = error.map(|e| match (e.retry, status) {
            (Retry::Retryable, DeliveryStatus::Failed) => "retries_exhausted",
            _ => e.class,
        });
        let retry_in_ms = match (error, status) {
            (Some(e), DeliveryStatus::Pending) => Some(
                self.backoff(retries_made as u32 + 1)
                    .max(e.retry_after.unwrap_or_default())
                    .as_millis() as i64,
            ),
            _ => None,
        };
        let provider_ref = result.as_ref().ok().and_then(|r| r.provider_ref.clone());
        // A gateway without callbacks is asked for the receipt of what it accepted.
        let poll = (status == DeliveryStatus::Success
            && provider_ref.is_some()
            && self.receipt_polls.channels.contains(&via))
        .then_some((self.receipt_polls.first_wait, self.receipt_polls.deadline));
        // PostgreSQL text cannot hold NUL, and a provider's error message is not ours to trust.
        let message = error.map(|e| e.message.replace('\0', ""));
        let dead_letter = match (status, class) {
            (DeliveryStatus::Failed, Some(class)) => {
                Some(self.dead_letter(job, channel, class, error, retries_made as u32))
            }
            _ => None,
        };
        Finished {
            event: job.event(status, attempt, message, job.version, started_at),
            lease_until: job.lease_until,
            retry_in_ms,
            error_class: class.map(str::to_owned),
            sent_via: (via != channel).then_some(via),
            provider_ref,
            poll,
            via,
            started_at,
            latency_ms: latency.as_millis().min(i32::MAX as u128) as i32,
            outcome: outcome_label,
            dead_letter,
        }
    }

    /// Counts a written record of an attempt in the metrics, and says what became of it.
    fn count(&self, job: &Job, status: DeliveryStatus, written: Written) -> Outcome {
        let channel = job.channel;
        if written == Written::LeaseLost {
            metrics::counter!("herald_lease_lost_total", "channel" => channel.as_str())
                .increment(1);
            tracing::warn!(delivery = %job.delivery_id, "lease expired during the send; another worker owns the delivery");
            return Outcome::LeaseLost;
        }
        let outcome = match status {
            DeliveryStatus::Success => Outcome::Sent,
            DeliveryStatus::Pending => Outcome::Retrying,
            _ => Outcome::Failed,
        };
        let label = match outcome {
            Outcome::Sent => "success",
            Outcome::Retrying => "retry",
            _ => "failed",
        };
        metrics::counter!("herald_deliveries_total", "channel" => channel.as_str().to_owned(), "outcome" => label)
            .increment(1);
        if outcome == Outcome::Sent {
            let since = (Utc::now() - job.created_at).num_milliseconds().max(0) as f64 / 1000.0;
            metrics::histogram!("herald_delivery_latency_seconds", "channel" => channel.as_str())
                .record(since);
        }
        outcome
    }

    /// SKIPs a delivery without an attempt, with `reason` (counted under `label`).
    async fn skip(&self, job: &Job, reason: &str, label: &'static str) -> anyhow::Result<Outcome> {
        let written = self.write(job, skipped(job, reason)).await?;
        Ok(count_skip(job, label, written))
    }

    /// Writes a finished send. A digest's record is written with the same outcome for
    /// each of its other members, all in one transaction of their own: a crash cannot
    /// leave some recorded and the rest to be sent again. Said lost when the lead's lease is.
    async fn write(&self, job: &Job, finished: Finished) -> anyhow::Result<Written> {
        if job.members.is_empty() {
            return self
                .recorder
                .record(&self.db, &self.topic_prefix, finished)
                .await;
        }
        let mut records: Vec<Finished> = job
            .members
            .iter()
            .map(|member| Finished {
                event: {
                    let mut event = member.event(
                        finished.event.status,
                        member.attempts + (finished.event.attempts - job.attempts),
                        finished.event.error.clone(),
                        member.version,
                        finished.started_at,
                    );
                    event.digest_id = job.digest_id;
                    event
                },
                lease_until: member.lease_until,
                retry_in_ms: finished.retry_in_ms,
                error_class: finished.error_class.clone(),
                sent_via: finished.sent_via,
                // The message's receipt is followed on the lead alone.
                provider_ref: None,
                poll: None,
                via: finished.via,
                started_at: finished.started_at,
                latency_ms: finished.latency_ms,
                outcome: finished.outcome,
                dead_letter: finished
                    .dead_letter
                    .as_ref()
                    .map(|_| self.member_dead_letter(member, &finished)),
            })
            .collect();
        records.insert(0, finished);
        metrics::histogram!("herald_digest_members").record(records.len() as f64);
        let written = self
            .recorder
            .record_together(&self.db, &self.topic_prefix, &records)
            .await?;
        Ok(written[0])
    }

    /// The dead letter of a digest member whose message failed for good.
    fn member_dead_letter(&self, member: &Job, finished: &Finished) -> OutboxMessage {
        let class = finished.error_class.as_deref().unwrap_or("unknown");
        let error =
            SendError::permanent("digest", finished.event.error.clone().unwrap_or_default());
        let retries = (member.attempts - member.retry_base).max(0) as u32;
        self.dead_letter(member, member.channel, class, Some(&error), retries)
    }

    /// The delay before retry `n` (1-based), with jitter.
    fn backoff(&self, n: u32) -> Duration {
        let steps = &self.settings.backoff;
        let base = steps[(n as usize - 1).min(steps.len() - 1)];
        if self.settings.jitter == 0.0 {
            return base;
        }
        let random = (Uuid::new_v4().as_u128() % 10_000) as f64 / 10_000.0;
        base.mul_f64(1.0 + self.settings.jitter * random)
    }

    fn dead_letter(
        &self,
        job: &Job,
        channel: Channel,
        class: &str,
        error: Option<&SendError>,
        retries: u32,
    ) -> OutboxMessage {
        let domain = job.domain;
        // The original event bytes; a notification taken in over HTTP has none, so its
        // stored form stands in for them.
        let payload = job.raw_event.clone().unwrap_or_else(|| {
            json!({
                "notificationId": job.notification_id,
                "eventType": job.event_type,
                "userId": job.user_id,
                "recipient": job.recipient,
                "data": job.data,
                "subject": job.subject,
                "body": job.body,
            })
            .to_string()
            .into_bytes()
        });
        let key = job
            .user_id
            .map(|u| u.to_string())
            .unwrap_or_else(|| job.notification_id.to_string());
        DeadLetter {
            domain: Some(domain),
            error_message: error.map(|e| e.message.clone()).unwrap_or_default(),
            error_class: class.to_owned(),
            retry_count: retries,
            failed_channel: Some(channel),
            original_topic: job.source_topic.clone(),
            original_partition: job.source_partition,
            original_offset: job.source_offset,
            consumer_group: job
                .source_topic
                .as_ref()
                .map(|_| format!("{}{}", self.topic_prefix, domain.consumer_group())),
            event_id: job.event_id.clone(),
            notification_id: Some(job.notification_id),
            delivery_id: Some(job.delivery_id),
            failed_at: Utc::now(),
            replay: job.replay(),
        }
        .to_outbox(&self.topic_prefix, Some(key.into_bytes()), payload)
    }

    fn announce(&self, channel: Channel, transition: Transition) {
        let text = match transition {
            Transition::Opened => {
                tracing::warn!(%channel, "circuit breaker opened");
                format!(
                    ":rotating_light: Herald: the {channel} channel's circuit breaker opened after {} consecutive failures; its deliveries wait{}.",
                    self.settings.breaker_threshold,
                    self.fallback_for(channel)
                        .map(|f| format!(" or go out as {f}"))
                        .unwrap_or_default()
                )
            }
            Transition::Closed => {
                tracing::info!(%channel, "circuit breaker closed");
                format!(
                    ":white_check_mark: Herald: the {channel} channel's circuit breaker closed; sending again."
                )
            }
        };
        let to = match transition {
            Transition::Opened => "open",
            Transition::Closed => "closed",
        };
        metrics::counter!("herald_circuit_transitions_total", "channel" => channel.as_str(), "to" => to)
            .increment(1);
        if channel != Channel::Slack
            && let Some(announcer) = &self.announcer
        {
            announcer(text);
        }
    }
}

/// The longest an in-transaction send (a Redis PUBLISH, or a quick channel's send) may
/// take: its transaction holds the deliveries' rows and a connection meanwhile.
const LOCKED_SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// The record of a delivery SKIPPED without an attempt, with `reason`.
fn skipped(job: &Job, reason: &str) -> Finished {
    let now = Utc::now();
    Finished {
        event: job.event(
            DeliveryStatus::Skipped,
            job.attempts,
            Some(reason.to_owned()),
            job.version,
            now,
        ),
        lease_until: job.lease_until,
        retry_in_ms: None,
        error_class: None,
        sent_via: None,
        provider_ref: None,
        poll: None,
        via: job.channel,
        started_at: now,
        latency_ms: 0,
        outcome: record::SKIPPED,
        dead_letter: None,
    }
}

/// Counts a written SKIP under `label`, and says what became of the delivery.
fn count_skip(job: &Job, label: &'static str, written: Written) -> Outcome {
    if written == Written::LeaseLost {
        return Outcome::LeaseLost;
    }
    metrics::counter!("herald_deliveries_total", "channel" => job.channel.as_str().to_owned(), "outcome" => label)
        .increment(1);
    Outcome::Skipped
}

/// Records sends of locked deliveries in a savepoint of `tx`, so that a batch PostgreSQL
/// refuses, or a deadlock, leaves the transaction (and its locks) usable: a deadlock is
/// tried again, a refused batch written one by one.
async fn record_locked(
    tx: &mut Transaction<'static, Postgres>,
    topic_prefix: &str,
    records: &[Finished],
) -> anyhow::Result<Vec<Written>> {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut savepoint = tx.begin().await.context("Failed to begin a savepoint")?;
        match deliveries::record_in(&mut savepoint, topic_prefix, records).await {
            Ok(written) => {
                savepoint
                    .commit()
                    .await
                    .context("Failed to release a savepoint")?;
                return Ok(written);
            }
            Err(error) if tries < 3 && is_lost_race(&error) => {
                savepoint.rollback().await.context("Failed to roll back")?;
                tracing::debug!(
                    error = format!("{error:#}"),
                    "send records lost a race; again"
                );
            }
            Err(error) => {
                // Back to before the batch, so that the transaction stays usable.
                let _ = savepoint.rollback().await;
                return Err(error);
            }
        }
    }
}

/// Rolls `tx` back at once (its locks must be gone before the deliveries are leased on
/// another connection) and hands back `error`.
async fn rolled_back(tx: Transaction<'static, Postgres>, error: anyhow::Error) -> anyhow::Error {
    let _ = tx.rollback().await;
    error
}
