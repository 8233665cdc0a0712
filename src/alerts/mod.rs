//! Delivery-health alerts evaluated by Herald itself (issue 16, item 8), for teams without
//! Alertmanager: the thresholds of dashboards/alerts.yml's `herald-delivery` group, under
//! the same names, announced on the ops Slack and listed at `GET /api/v1/admin/alerts`.
//!
//! - **From PostgreSQL, not from one process's metrics**, so the figures cover every
//!   instance ([`measure`]). Nothing is written on the per-event path: the rules read what
//!   dispatch records anyway, through primary keys (module docs of [`measure`]).
//! - **One instance at a time.** A round is one transaction that first takes a
//!   transaction-scoped advisory lock (`pg_try_advisory_xact_lock`); an instance that does
//!   not get it skips the round, and a round less than half an interval after the last one
//!   is skipped too, so N instances of the role do not evaluate N times as often. The lock
//!   goes with the transaction: a crashed instance leaves nothing to expire.
//! - **No flapping** ([`state`]): an alert fires once its condition has held for the rule's
//!   `for`, and resolves only once it has been clear for `resolve_after`.
//! - **Announced once.** Each alert's state (status, since, what Slack was last told) is a
//!   row of `alert_states` (migration 0018), read and written inside the locked round, so a
//!   restart or another instance taking over continues from it instead of announcing
//!   again. A round posts what its state still owes ([`state::Track::due`]) and records the
//!   announcement in the same transaction. If Slack is down (or answers an error), nothing
//!   is recorded and the next round posts again: at least once. The one duplicate left is a
//!   post that Slack took but whose round then failed to commit (PostgreSQL lost in between):
//!   the next round posts it again.

pub mod measure;
pub mod state;

use std::{collections::HashMap, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::{channels::slack::SlackSender, config::AlertSettings};
use state::{Announcement, Status, Timing, Track};

/// The advisory lock of a round.
const LOCK: i64 = 0x6865_7261_6c64_616c; // "heraldal"

/// One rule, named as in dashboards/alerts.yml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A channel's successful share of its sends is low (per channel).
    ChannelSuccessRateLow,
    /// Too many deliveries wait (whole platform).
    PendingDeliveriesHigh,
    /// A channel's provider answers slowly at p99 (per channel).
    ProviderSlow,
    /// Dead letters arrive in numbers (per domain).
    DeadLettersArriving,
}

impl Rule {
    /// Every rule, in the order they are listed.
    pub const ALL: [Rule; 4] = [
        Rule::ChannelSuccessRateLow,
        Rule::PendingDeliveriesHigh,
        Rule::ProviderSlow,
        Rule::DeadLettersArriving,
    ];

    /// The alert's name (as in dashboards/alerts.yml).
    pub fn name(self) -> &'static str {
        match self {
            Rule::ChannelSuccessRateLow => "HeraldChannelSuccessRateLow",
            Rule::PendingDeliveriesHigh => "HeraldPendingDeliveriesHigh",
            Rule::ProviderSlow => "HeraldProviderSlow",
            Rule::DeadLettersArriving => "HeraldDeadLettersArriving",
        }
    }

    /// The rule of a stored name.
    pub fn parse(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.name() == name)
    }

    /// `page` wakes someone, `ticket` waits for working hours.
    pub fn severity(self) -> &'static str {
        match self {
            Rule::ChannelSuccessRateLow | Rule::PendingDeliveriesHigh => "page",
            Rule::ProviderSlow | Rule::DeadLettersArriving => "ticket",
        }
    }

    /// What to look at first.
    pub fn runbook(self) -> &'static str {
        match self {
            Rule::ChannelSuccessRateLow => {
                "GET /api/v1/dashboard/delivery/failures shows the errors; if the provider is down \
                 the circuit breaker opens and deliveries wait. A template or address error is in \
                 the DLQ (GET /api/v1/admin/dlq?status=PENDING): fix the cause, then retry-all."
            }
            Rule::PendingDeliveriesHigh => {
                "Dispatch does not keep up or a channel is held back: check the circuit state and \
                 rate limits per channel, the send latency, and whether dispatch instances run \
                 (serve --roles dispatch). A large broadcast raises it on purpose for a while."
            }
            Rule::ProviderSlow => {
                "The provider (SMTP server, Slack, gateway) is slow: sends hold their slots longer \
                 and throughput falls. Check the provider's status page; HERALD_SEND_TIMEOUT_SECS \
                 bounds it."
            }
            Rule::DeadLettersArriving => {
                "GET /api/v1/admin/dlq?domain=...&status=PENDING lists them with their error class: \
                 decode or schema_violation is an upstream contract problem (tell the publishing \
                 team); retries_exhausted or http_4xx is a channel problem."
            }
        }
    }

    /// The threshold, in the unit of the rule's value (a fraction, a count, seconds).
    pub fn threshold(self, s: &AlertSettings) -> f64 {
        match self {
            Rule::ChannelSuccessRateLow => s.success_rate_min,
            Rule::PendingDeliveriesHigh => s.pending_max as f64,
            Rule::ProviderSlow => s.send_p99_max.as_secs_f64(),
            Rule::DeadLettersArriving => s.dead_letters_max as f64,
        }
    }

    /// How long the condition must hold, and stay clear.
    pub fn timing(self, s: &AlertSettings) -> Timing {
        let fire_after = match self {
            Rule::ChannelSuccessRateLow => s.success_rate_for,
            Rule::PendingDeliveriesHigh => s.pending_for,
            Rule::ProviderSlow => s.send_p99_for,
            Rule::DeadLettersArriving => s.dead_letters_for,
        };
        Timing {
            fire_after,
            resolve_after: s.resolve_after,
        }
    }

    /// The period the value is taken over (none: a count at the moment).
    pub fn window(self, s: &AlertSettings) -> Option<Duration> {
        match self {
            Rule::ChannelSuccessRateLow => Some(s.success_rate_window),
            Rule::PendingDeliveriesHigh => None,
            Rule::ProviderSlow => Some(s.send_p99_window),
            Rule::DeadLettersArriving => Some(s.dead_letters_window),
        }
    }

    /// The value as a person reads it.
    fn show(self, value: f64) -> String {
        match self {
            Rule::ChannelSuccessRateLow => format!("{:.1} %", value * 100.0),
            Rule::ProviderSlow => format!("{value:.2} s"),
            Rule::PendingDeliveriesHigh | Rule::DeadLettersArriving => format!("{value:.0}"),
        }
    }

    /// What the value measures, in words.
    fn measures(self) -> &'static str {
        match self {
            Rule::ChannelSuccessRateLow => "success rate",
            Rule::PendingDeliveriesHigh => "pending deliveries",
            Rule::ProviderSlow => "p99 send time",
            Rule::DeadLettersArriving => "dead letters",
        }
    }

    /// Which side of the threshold is bad.
    fn bad_side(self) -> &'static str {
        match self {
            Rule::ChannelSuccessRateLow => "below",
            _ => "above",
        }
    }
}

/// What one round measured for one alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub rule: Rule,
    /// The channel or domain the alert is about; empty for the whole platform.
    pub subject: String,
    /// None when there is nothing to measure (no sends in the window).
    pub value: Option<f64>,
    pub breached: bool,
}

/// The ops Slack message of an announcement.
pub fn message(reading: &Reading, announcement: Announcement, s: &AlertSettings) -> String {
    let rule = reading.rule;
    let about = if reading.subject.is_empty() {
        String::new()
    } else {
        format!(" ({})", reading.subject)
    };
    let over = rule
        .window(s)
        .map(|w| format!(" over {}", humantime_secs(w)))
        .unwrap_or_default();
    let value = match reading.value {
        Some(v) => format!("{} {}{over}", rule.measures(), rule.show(v)),
        None => format!("no {} to measure{over}", rule.measures()),
    };
    let threshold = rule.show(rule.threshold(s));
    match announcement {
        Announcement::Firing => format!(
            ":rotating_light: FIRING [{}] {}{about}: {value}, {} the threshold {threshold}.\nRunbook: {}",
            rule.severity(),
            rule.name(),
            rule.bad_side(),
            rule.runbook(),
        ),
        Announcement::Resolved => format!(
            ":white_check_mark: RESOLVED {}{about}: {value} (threshold {threshold}).",
            rule.name(),
        ),
    }
}

fn humantime_secs(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// What one round did.
#[derive(Debug, Default)]
pub struct Round {
    /// Alerts evaluated.
    pub evaluated: usize,
    /// Announcements posted (and recorded).
    pub announced: Vec<(Rule, String, Announcement)>,
}

/// Evaluates every rule once, announcing on `slack` what is due (module docs). `None` when
/// another instance holds the round or evaluated less than half an interval ago.
pub async fn evaluate(
    db: &PgPool,
    settings: &AlertSettings,
    slack: Option<&SlackSender>,
) -> anyhow::Result<Option<Round>> {
    let mut tx = db.begin().await.context("Failed to begin an alert round")?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(LOCK)
        .fetch_one(&mut *tx)
        .await
        .context("Failed to take the alert lock")?;
    if !locked {
        return Ok(None);
    }
    // The database's clock, so that instances whose clocks differ agree on every `for`.
    let (now, last): (DateTime<Utc>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT now(), (SELECT max(evaluated_at) FROM alert_states)")
            .fetch_one(&mut *tx)
            .await
            .context("Failed to read the last alert round")?;
    if let Some(last) = last
        && (now - last).to_std().unwrap_or(Duration::ZERO) < settings.interval / 2
    {
        return Ok(None);
    }
    let mut readings = measure::all(&mut tx, settings, now).await?;
    let mut tracks = load(&mut tx).await?;
    // An alert not measured this round (a channel that stopped sending) is clear.
    for (rule, subject) in tracks.keys() {
        if !readings
            .iter()
            .any(|r| r.rule == *rule && r.subject == *subject)
        {
            readings.push(Reading {
                rule: *rule,
                subject: subject.clone(),
                value: None,
                breached: false,
            });
        }
    }
    let mut round = Round::default();
    for reading in readings {
        let key = (reading.rule, reading.subject.clone());
        let before = tracks.remove(&key).unwrap_or_else(|| Track::new(now));
        let mut track = before.step(reading.breached, now, reading.rule.timing(settings));
        if let (Some(due), Some(slack)) = (track.due(), slack)
            && announce(slack, &reading, due, settings).await
        {
            track = track.announced(due, now);
            round
                .announced
                .push((reading.rule, reading.subject.clone(), due));
        }
        save(&mut tx, &reading, &track, settings, now).await?;
        metrics::gauge!(
            "herald_alert_firing",
            "alert" => reading.rule.name(),
            "subject" => reading.subject.clone()
        )
        .set(if track.status == Status::Firing {
            1.0
        } else {
            0.0
        });
        round.evaluated += 1;
    }
    tx.commit()
        .await
        .context("Failed to commit an alert round")?;
    Ok(Some(round))
}

/// Posts one announcement; false when it did not go out (the next round tries again).
async fn announce(
    slack: &SlackSender,
    reading: &Reading,
    announcement: Announcement,
    settings: &AlertSettings,
) -> bool {
    let text = message(reading, announcement, settings);
    let result = slack.post_text(&text).await;
    let outcome = if result.is_ok() { "sent" } else { "failed" };
    metrics::counter!(
        "herald_alert_announcements_total",
        "alert" => reading.rule.name(),
        "announcement" => announcement.as_str(),
        "outcome" => outcome
    )
    .increment(1);
    match result {
        Ok(()) => {
            tracing::info!(alert = reading.rule.name(), subject = %reading.subject, announcement = announcement.as_str(), "alert announced");
            true
        }
        Err(error) => {
            tracing::warn!(
                alert = reading.rule.name(),
                subject = %reading.subject,
                %error,
                "cannot announce an alert on Slack; the next round tries again"
            );
            false
        }
    }
}

type Tracks = HashMap<(Rule, String), Track>;

async fn load(conn: &mut PgConnection) -> anyhow::Result<Tracks> {
    type Row = (
        String,
        String,
        String,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Option<String>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT rule, subject, status, since, clear_since, announced, announced_at \
         FROM alert_states",
    )
    .fetch_all(conn)
    .await
    .context("Failed to read the alert states")?;
    Ok(rows
        .into_iter()
        .filter_map(
            |(rule, subject, status, since, clear_since, announced, at)| {
                // A rule a later version dropped is left alone.
                let track = Track {
                    status: Status::parse(&status)?,
                    since,
                    clear_since,
                    announced: announced.as_deref().and_then(Announcement::parse),
                    announced_at: at,
                };
                Some(((Rule::parse(&rule)?, subject), track))
            },
        )
        .collect())
}

async fn save(
    conn: &mut PgConnection,
    reading: &Reading,
    track: &Track,
    settings: &AlertSettings,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO alert_states (rule, subject, status, since, clear_since, value, threshold, \
             announced, announced_at, evaluated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (rule, subject) DO UPDATE SET status = EXCLUDED.status, \
             since = EXCLUDED.since, clear_since = EXCLUDED.clear_since, value = EXCLUDED.value, \
             threshold = EXCLUDED.threshold, announced = EXCLUDED.announced, \
             announced_at = EXCLUDED.announced_at, evaluated_at = EXCLUDED.evaluated_at",
    )
    .bind(reading.rule.name())
    .bind(&reading.subject)
    .bind(track.status.as_str())
    .bind(track.since)
    .bind(track.clear_since)
    .bind(reading.value)
    .bind(reading.rule.threshold(settings))
    .bind(track.announced.map(Announcement::as_str))
    .bind(track.announced_at)
    .bind(now)
    .execute(conn)
    .await
    .context("Failed to save an alert state")?;
    Ok(())
}

/// One alert as `GET /api/v1/admin/alerts` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Alert)]
pub struct AlertView {
    pub alert: String,
    pub subject: String,
    #[sqlx(skip)]
    pub severity: &'static str,
    pub state: String,
    pub value: Option<f64>,
    pub threshold: f64,
    pub since: DateTime<Utc>,
    pub clear_since: Option<DateTime<Utc>>,
    pub last_announced: Option<String>,
    pub last_announced_at: Option<DateTime<Utc>>,
    pub evaluated_at: DateTime<Utc>,
}

/// The alerts as last evaluated, by rule then subject.
pub async fn list(db: &PgPool) -> anyhow::Result<Vec<AlertView>> {
    let mut alerts: Vec<AlertView> = sqlx::query_as(
        "SELECT rule AS alert, subject, status AS state, value, threshold, since, clear_since, \
             announced AS last_announced, announced_at AS last_announced_at, evaluated_at \
         FROM alert_states ORDER BY rule, subject",
    )
    .fetch_all(db)
    .await
    .context("Failed to list the alert states")?;
    for alert in &mut alerts {
        alert.severity = Rule::parse(&alert.alert).map_or("unknown", Rule::severity);
    }
    Ok(alerts)
}

/// Evaluates every `interval` until `shutdown` (nothing when alerts are disabled).
pub async fn run(
    db: PgPool,
    settings: AlertSettings,
    slack: Option<SlackSender>,
    shutdown: CancellationToken,
) {
    if !settings.enabled {
        tracing::info!("in-process alerts are off (HERALD_ALERTS_ENABLED)");
        return;
    }
    if slack.is_none() {
        tracing::info!(
            "HERALD_SLACK_WEBHOOK_URL is not set: alerts are evaluated but not announced"
        );
    }
    let mut every = tokio::time::interval(settings.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match evaluate(&db, &settings, slack.as_ref()).await {
            Ok(Some(round)) => tracing::debug!(
                evaluated = round.evaluated,
                announced = round.announced.len(),
                "alert round"
            ),
            Ok(None) => tracing::debug!("alert round left to another instance"),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "cannot evaluate the alerts; retrying next round"
            ),
        }
    }
}
