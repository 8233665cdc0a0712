//! Layered settings: defaults from a TOML file under `config/`, then `HERALD_*` environment
//! variables on top (DESIGN §6).
//!
//! Every value is parsed once, here, into a typed field. A bad value stops startup with a
//! [`ConfigError`] that names where it came from (the variable, or the file and key) and
//! what was expected. Secrets (URLs that may carry credentials, the admin token, the Slack
//! webhook) are [`SecretString`]s: their `Debug` output is redacted and their values never
//! appear in an error message.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};

use crate::domain::Channel;
use serde::Deserialize;
use url::Url;

/// The file read when `HERALD_CONFIG_FILE` is not set, relative to the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "config/default.toml";

/// Everything Herald needs to know to run, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub redis: RedisSettings,
    pub smtp: SmtpSettings,
    pub limits: LimitSettings,
    pub channels: ChannelSettings,
    pub admin: AdminSettings,
    pub access: AccessSettings,
    pub shutdown: ShutdownSettings,
    pub ingest: IngestSettings,
    pub templates: TemplateSettings,
    pub dispatch: DispatchSettings,
    pub read_model: ReadModelSettings,
    pub broadcast: BroadcastSettings,
    pub retention: RetentionSettings,
    pub webhooks: WebhookSettings,
    pub dlq: DlqSettings,
    pub alerts: AlertSettings,
}

/// Operators' replays of dead letters (see [`crate::dlq::replay`]).
#[derive(Debug, Clone)]
pub struct DlqSettings {
    /// Replays of one letter beyond which another needs `force` (`HERALD_DLQ_REPLAY_CAP`).
    pub replay_cap: u32,
    /// Letters per second a replay by filter goes at unless it says otherwise
    /// (`HERALD_DLQ_REPLAY_RATE`).
    pub replay_rate: u32,
}

impl DlqSettings {
    fn load(layers: &Layers, raw: RawDlq) -> Result<Self, ConfigError> {
        let cap = layers.required(
            "HERALD_DLQ_REPLAY_CAP",
            "dlq.replay_cap",
            raw.replay_cap.map(|n| n.to_string()),
        )?;
        let rate = layers.required(
            "HERALD_DLQ_REPLAY_RATE",
            "dlq.replay_rate",
            raw.replay_rate.map(|n| n.to_string()),
        )?;
        Ok(DlqSettings {
            replay_cap: cap.positive_u32("a whole number above 0")?,
            replay_rate: rate.u32_in(
                1..=crate::dlq::replay::MAX_RATE,
                "a whole number of letters per second from 1 to 1000",
            )?,
        })
    }
}

/// Signed outbound webhooks (see [`crate::webhooks`]).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Endpoints on loopback, private, link-local and other non-public addresses are
    /// refused unless this is set (`HERALD_WEBHOOKS_ALLOW_PRIVATE`).
    pub allow_private: bool,
    /// The waits before each retry; the last repeats.
    pub backoff: Vec<Duration>,
    /// How long a call is retried before it is dead-lettered to the operators.
    pub give_up_after: Duration,
    /// An endpoint failing for this long is disabled and reported.
    pub disable_after: Duration,
}

impl WebhookSettings {
    fn load(layers: &Layers, raw: RawWebhooks) -> Result<Self, ConfigError> {
        let allow_private = layers.required(
            "HERALD_WEBHOOKS_ALLOW_PRIVATE",
            "webhooks.allow_private",
            raw.allow_private.map(|b| b.to_string()),
        )?;
        let backoff = layers.required(
            "HERALD_WEBHOOK_BACKOFF_MS",
            "webhooks.backoff_ms",
            raw.backoff_ms
                .map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
        )?;
        let give_up = layers.required(
            "HERALD_WEBHOOK_GIVE_UP_AFTER",
            "webhooks.give_up_after",
            raw.give_up_after,
        )?;
        let disable = layers.required(
            "HERALD_WEBHOOK_DISABLE_AFTER",
            "webhooks.disable_after",
            raw.disable_after,
        )?;
        Ok(WebhookSettings {
            allow_private: allow_private.flag()?,
            backoff: backoff.millis_list()?,
            give_up_after: give_up.duration()?,
            disable_after: disable.duration()?,
        })
    }
}

/// The delivery-health alerts Herald evaluates itself (see [`crate::alerts`]): the
/// thresholds of dashboards/alerts.yml, for teams without Alertmanager.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// Off: no evaluation, no announcement (`HERALD_ALERTS_ENABLED`).
    pub enabled: bool,
    /// How often one instance evaluates the rules.
    pub interval: Duration,
    /// How long a firing alert's condition must stay clear before it resolves.
    pub resolve_after: Duration,
    /// A channel's share of successful sends below this fires (0 to 1).
    pub success_rate_min: f64,
    pub success_rate_window: Duration,
    /// The rate counts only while the channel sends at least this many times a second.
    pub success_rate_min_sends_per_second: f64,
    pub success_rate_for: Duration,
    /// More PENDING deliveries than this fires.
    pub pending_max: i64,
    pub pending_for: Duration,
    /// A channel's p99 send time above this fires.
    pub send_p99_max: Duration,
    pub send_p99_window: Duration,
    pub send_p99_for: Duration,
    /// More dead letters than this in a domain within the window fires.
    pub dead_letters_max: i64,
    pub dead_letters_window: Duration,
    pub dead_letters_for: Duration,
}

impl AlertSettings {
    fn load(layers: &Layers, raw: RawAlerts) -> Result<Self, ConfigError> {
        let text = |v: Option<f64>| v.map(|n| n.to_string());
        let enabled = layers.required(
            "HERALD_ALERTS_ENABLED",
            "alerts.enabled",
            raw.enabled.map(|b| b.to_string()),
        )?;
        let get = |var, key, value| layers.required(var, key, value);
        let interval = get("HERALD_ALERTS_INTERVAL", "alerts.interval", raw.interval)?;
        let resolve_after = get(
            "HERALD_ALERTS_RESOLVE_AFTER",
            "alerts.resolve_after",
            raw.resolve_after,
        )?;
        let rate_min = get(
            "HERALD_ALERTS_SUCCESS_RATE_MIN",
            "alerts.success_rate_min",
            text(raw.success_rate_min),
        )?;
        let rate_window = get(
            "HERALD_ALERTS_SUCCESS_RATE_WINDOW",
            "alerts.success_rate_window",
            raw.success_rate_window,
        )?;
        let rate_volume = get(
            "HERALD_ALERTS_SUCCESS_RATE_MIN_SENDS_PER_SECOND",
            "alerts.success_rate_min_sends_per_second",
            text(raw.success_rate_min_sends_per_second),
        )?;
        let rate_for = get(
            "HERALD_ALERTS_SUCCESS_RATE_FOR",
            "alerts.success_rate_for",
            raw.success_rate_for,
        )?;
        let pending_max = get(
            "HERALD_ALERTS_PENDING_MAX",
            "alerts.pending_max",
            raw.pending_max.map(|n| n.to_string()),
        )?;
        let pending_for = get(
            "HERALD_ALERTS_PENDING_FOR",
            "alerts.pending_for",
            raw.pending_for,
        )?;
        let p99_max = get(
            "HERALD_ALERTS_SEND_P99_MAX",
            "alerts.send_p99_max",
            raw.send_p99_max,
        )?;
        let p99_window = get(
            "HERALD_ALERTS_SEND_P99_WINDOW",
            "alerts.send_p99_window",
            raw.send_p99_window,
        )?;
        let p99_for = get(
            "HERALD_ALERTS_SEND_P99_FOR",
            "alerts.send_p99_for",
            raw.send_p99_for,
        )?;
        let dead_max = get(
            "HERALD_ALERTS_DEAD_LETTERS_MAX",
            "alerts.dead_letters_max",
            raw.dead_letters_max.map(|n| n.to_string()),
        )?;
        let dead_window = get(
            "HERALD_ALERTS_DEAD_LETTERS_WINDOW",
            "alerts.dead_letters_window",
            raw.dead_letters_window,
        )?;
        let dead_for = get(
            "HERALD_ALERTS_DEAD_LETTERS_FOR",
            "alerts.dead_letters_for",
            raw.dead_letters_for,
        )?;
        Ok(AlertSettings {
            enabled: enabled.flag()?,
            interval: interval.duration()?,
            resolve_after: resolve_after.duration_or_zero()?,
            success_rate_min: rate_min.fraction()?,
            success_rate_window: rate_window.duration()?,
            success_rate_min_sends_per_second: rate_volume
                .parse_with::<f64>("a number of sends per second, 0 or more")
                .and_then(|n| {
                    (n.is_finite() && n >= 0.0).then_some(n).ok_or_else(|| {
                        rate_volume.invalid("a number of sends per second, 0 or more")
                    })
                })?,
            success_rate_for: rate_for.duration_or_zero()?,
            pending_max: i64::from(pending_max.positive_u32("a positive whole number")?),
            pending_for: pending_for.duration_or_zero()?,
            send_p99_max: p99_max.duration()?,
            send_p99_window: p99_window.duration()?,
            send_p99_for: p99_for.duration_or_zero()?,
            dead_letters_max: i64::from(
                dead_max.u32_in(0..=u32::MAX, "a whole number, 0 or more")?,
            ),
            dead_letters_window: dead_window.duration()?,
            dead_letters_for: dead_for.duration_or_zero()?,
        })
    }
}

/// How long history is kept (see [`crate::retention`]).
#[derive(Debug, Clone)]
pub struct RetentionSettings {
    /// Notifications, deliveries, attempts, the log and statistics older than this go.
    pub history: Duration,
    /// Dead letters discarded or successfully retried this long ago go (pending ones stay).
    pub dead_letters: Duration,
}

impl RetentionSettings {
    fn load(layers: &Layers, raw: RawRetention) -> Result<Self, ConfigError> {
        let history = layers.required("HERALD_RETENTION", "retention.history", raw.history)?;
        let dead_letters = layers.required(
            "HERALD_DLQ_RETENTION",
            "retention.dead_letters",
            raw.dead_letters,
        )?;
        Ok(RetentionSettings {
            history: history.duration()?,
            dead_letters: dead_letters.duration()?,
        })
    }
}

/// Broadcasts: how the fan-out paces itself and what share of dispatch it may take.
#[derive(Debug, Clone)]
pub struct BroadcastSettings {
    /// Recipients turned into notifications per transaction.
    pub batch_size: usize,
    /// Fraction of each channel's concurrency (and of each claim) that broadcast deliveries
    /// may take; the rest stays free for transactional notifications.
    pub dispatch_share: f64,
    /// The fan-out waits while a broadcast has this many deliveries not yet sent, so a
    /// 100,000-recipient broadcast never floods the queue (and a cancel stops most of it).
    pub max_queued_deliveries: usize,
    /// How long one instance holds a broadcast it fans out; past it another resumes it.
    pub lease: Duration,
}

impl BroadcastSettings {
    fn load(layers: &Layers, raw: RawBroadcast) -> Result<Self, ConfigError> {
        let batch = layers.required(
            "HERALD_BROADCAST_BATCH_SIZE",
            "broadcast.batch_size",
            raw.batch_size.map(|n| n.to_string()),
        )?;
        let share = layers.required(
            "HERALD_BROADCAST_DISPATCH_SHARE",
            "broadcast.dispatch_share",
            raw.dispatch_share.map(|n| n.to_string()),
        )?;
        let queued = layers.required(
            "HERALD_BROADCAST_MAX_QUEUED_DELIVERIES",
            "broadcast.max_queued_deliveries",
            raw.max_queued_deliveries.map(|n| n.to_string()),
        )?;
        let lease = layers.required(
            "HERALD_BROADCAST_LEASE_SECS",
            "broadcast.lease_secs",
            raw.lease_secs.map(|n| n.to_string()),
        )?;
        Ok(BroadcastSettings {
            batch_size: batch.positive_u32("a whole number above 0")? as usize,
            dispatch_share: match share.fraction()? {
                0.0 => return Err(share.invalid("a number above 0, at most 1")),
                share => share,
            },
            max_queued_deliveries: queued.positive_u32("a whole number above 0")? as usize,
            lease: Duration::from_secs(u64::from(
                lease.positive_u32("a whole number of seconds above 0")?,
            )),
        })
    }
}

/// The query side.
#[derive(Debug, Clone)]
pub struct ReadModelSettings {
    /// The time zone whose calendar days delivery_stats counts in.
    pub reporting_timezone: chrono_tz::Tz,
    /// How long the projector gathers delivery events after the first of a batch before it
    /// applies them: a delivery created and finished within it is written to
    /// notification_log once instead of inserted and updated.
    pub projector_linger: Duration,
    /// Most delivery events one projector batch takes, lingering or not.
    pub projector_batch_max_messages: usize,
}

impl ReadModelSettings {
    fn load(layers: &Layers, raw: RawReadModel) -> Result<Self, ConfigError> {
        let reporting_timezone = layers.required(
            "HERALD_REPORTING_TIMEZONE",
            "read_model.reporting_timezone",
            raw.reporting_timezone,
        )?;
        let linger = layers.required(
            "HERALD_PROJECTOR_LINGER_MS",
            "read_model.projector_linger_ms",
            raw.projector_linger_ms.map(|n| n.to_string()),
        )?;
        let batch_max_messages = layers.required(
            "HERALD_PROJECTOR_BATCH_MAX_MESSAGES",
            "read_model.projector_batch_max_messages",
            raw.projector_batch_max_messages.map(|n| n.to_string()),
        )?;
        Ok(ReadModelSettings {
            reporting_timezone: reporting_timezone
                .parse_with("an IANA time zone such as UTC or Asia/Seoul")?,
            projector_linger: Duration::from_millis(u64::from(
                linger.positive_u32("a whole number of milliseconds above 0")?,
            )),
            projector_batch_max_messages: batch_max_messages
                .positive_u32("a whole number above 0")?
                as usize,
        })
    }
}

/// Delivery: concurrency, leases, retries, rate limits, circuit breakers, fallbacks.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Sends in flight at once, per channel, per instance.
    pub concurrency: usize,
    /// Most deliveries one claim takes.
    pub claim_batch: usize,
    /// How long a claimed delivery stays reserved; past it, another worker reclaims it.
    pub lease: Duration,
    /// Longest one send may take.
    pub send_timeout: Duration,
    /// A channel whose sends average this or less sends inside the transaction that finds
    /// its deliveries, without a claim ([`crate::dispatch::send_speed`]); zero never does.
    pub quick_send: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Delay before retry 1, 2, 3...; the last one repeats if there are more retries.
    pub backoff: Vec<Duration>,
    /// Random extra delay, as a fraction of the backoff (0 to 1).
    pub jitter: f64,
    /// Consecutive failures that open a channel's circuit breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker waits before letting one probe through.
    pub breaker_cooldown: Duration,
    /// Per channel: sends in flight at once where it differs from `concurrency`.
    pub channel_concurrency: BTreeMap<Channel, usize>,
    /// Per channel: at most `limit` sends in any `window`, shared by every instance.
    pub rate_limits: BTreeMap<Channel, RateLimit>,
    /// Per channel: where its deliveries go while its breaker is open.
    pub fallbacks: BTreeMap<Channel, Channel>,
    /// Bearer keys of the HTTP gateways.
    pub gateway_keys: BTreeMap<Channel, SecretString>,
}

impl DispatchSettings {
    fn load(layers: &Layers, raw: RawDispatch) -> Result<Self, ConfigError> {
        let concurrency = layers.required(
            "HERALD_DISPATCH_CONCURRENCY",
            "dispatch.concurrency",
            raw.concurrency.map(|n| n.to_string()),
        )?;
        let claim_batch = layers.required(
            "HERALD_DISPATCH_CLAIM_BATCH",
            "dispatch.claim_batch",
            raw.claim_batch.map(|n| n.to_string()),
        )?;
        let lease = layers.required(
            "HERALD_DISPATCH_LEASE_SECS",
            "dispatch.lease_secs",
            raw.lease_secs.map(|n| n.to_string()),
        )?;
        let send_timeout = layers.required(
            "HERALD_SEND_TIMEOUT_SECS",
            "dispatch.send_timeout_secs",
            raw.send_timeout_secs.map(|n| n.to_string()),
        )?;
        let quick_send = layers.required(
            "HERALD_DISPATCH_QUICK_SEND_MS",
            "dispatch.quick_send_ms",
            raw.quick_send_ms.map(|n| n.to_string()),
        )?;
        let max_retries = layers.required(
            "HERALD_MAX_RETRIES",
            "dispatch.max_retries",
            raw.max_retries.map(|n| n.to_string()),
        )?;
        let backoff = layers.required(
            "HERALD_RETRY_BACKOFF_MS",
            "dispatch.retry_backoff_ms",
            raw.retry_backoff_ms
                .map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
        )?;
        let jitter = layers.required(
            "HERALD_RETRY_JITTER",
            "dispatch.retry_jitter",
            raw.retry_jitter.map(|n| n.to_string()),
        )?;
        let breaker_threshold = layers.required(
            "HERALD_BREAKER_FAILURE_THRESHOLD",
            "dispatch.breaker_failure_threshold",
            raw.breaker_failure_threshold.map(|n| n.to_string()),
        )?;
        let breaker_cooldown = layers.required(
            "HERALD_BREAKER_COOLDOWN_SECS",
            "dispatch.breaker_cooldown_secs",
            raw.breaker_cooldown_secs.map(|n| n.to_string()),
        )?;
        let mut rate_limits = BTreeMap::new();
        for (channel, value) in
            layers.per_channel("HERALD_RATE_LIMIT", "dispatch.rate_limits", raw.rate_limits)
        {
            rate_limits.insert(channel, value.rate_limit()?);
        }
        let mut channel_concurrency = BTreeMap::new();
        for (channel, value) in layers.per_channel(
            "HERALD_DISPATCH_CONCURRENCY",
            "dispatch.channel_concurrency",
            raw.channel_concurrency,
        ) {
            let n = value.positive_u32("a whole number above 0")?;
            channel_concurrency.insert(channel, n as usize);
        }
        let mut gateway_keys = BTreeMap::new();
        for (channel, var) in [
            (Channel::Sms, "HERALD_SMS_GATEWAY_KEY"),
            (Channel::Kakaotalk, "HERALD_KAKAOTALK_GATEWAY_KEY"),
            (Channel::Push, "HERALD_PUSH_GATEWAY_KEY"),
        ] {
            if let Some(key) = (layers.env)(var).filter(|k| !k.trim().is_empty()) {
                gateway_keys.insert(channel, SecretString::from(key));
            }
        }
        Ok(DispatchSettings {
            concurrency: concurrency.positive_u32("a whole number above 0")? as usize,
            claim_batch: claim_batch.positive_u32("a whole number above 0")? as usize,
            lease: Duration::from_secs(u64::from(
                lease.positive_u32("a whole number of seconds above 0")?,
            )),
            send_timeout: Duration::from_secs(u64::from(
                send_timeout.positive_u32("a whole number of seconds above 0")?,
            )),
            quick_send: Duration::from_millis(
                quick_send
                    .u32_in(0..=1000, "a whole number of milliseconds, 0 to 1000")?
                    .into(),
            ),
            max_retries: max_retries.parse_with("a whole number of retries")?,
            backoff: backoff.millis_list()?,
            jitter: jitter.fraction()?,
            breaker_threshold: breaker_threshold
                .positive_u32("a whole number of failures above 0")?,
            breaker_cooldown: Duration::from_secs(u64::from(
                breaker_cooldown.positive_u32("a whole number of seconds above 0")?,
            )),
            channel_concurrency,
            rate_limits,
            fallbacks: raw.fallbacks,
            gateway_keys,
        })
    }

    /// Sends of `channel` in flight at once, per instance.
    pub fn concurrency_of(&self, channel: Channel) -> usize {
        self.channel_concurrency
            .get(&channel)
            .copied()
            .unwrap_or(self.concurrency)
    }
}

/// At most `limit` sends in any window of `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub window: Duration,
}

/// Kafka intake.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// The routing rules file.
    pub routing_file: PathBuf,
    /// Most messages one transaction takes.
    pub batch_max_messages: usize,
    /// Longest a batch waits to fill after its first message.
    pub batch_max_wait: Duration,
    /// Larger messages are poison.
    pub max_event_bytes: usize,
}

impl IngestSettings {
    fn load(layers: &Layers, raw: RawIngest) -> Result<Self, ConfigError> {
        let routing_file = layers.required(
            "HERALD_ROUTING_FILE",
            "ingest.routing_file",
            raw.routing_file,
        )?;
        let batch_max_messages = layers.required(
            "HERALD_INGEST_BATCH_MAX_MESSAGES",
            "ingest.batch_max_messages",
            raw.batch_max_messages.map(|n| n.to_string()),
        )?;
        let batch_max_wait = layers.required(
            "HERALD_INGEST_BATCH_MAX_WAIT_MS",
            "ingest.batch_max_wait_ms",
            raw.batch_max_wait_ms.map(|n| n.to_string()),
        )?;
        let max_event_bytes = layers.required(
            "HERALD_MAX_EVENT_BYTES",
            "ingest.max_event_bytes",
            raw.max_event_bytes.map(|n| n.to_string()),
        )?;
        Ok(IngestSettings {
            routing_file: PathBuf::from(routing_file.text),
            batch_max_messages: batch_max_messages
                .positive_u32("a whole number of messages above 0")?
                as usize,
            batch_max_wait: Duration::from_millis(u64::from(
                batch_max_wait.positive_u32("a whole number of milliseconds above 0")?,
            )),
            max_event_bytes: max_event_bytes.positive_u32("a whole number of bytes above 0")?
                as usize,
        })
    }
}

/// Notification templates.
#[derive(Debug, Clone)]
pub struct TemplateSettings {
    /// The folder holding `{locale}/{EVENT_TYPE}/*`.
    pub dir: PathBuf,
    /// The folder holding each event type's data schema, `{EVENT_TYPE}.json`.
    pub schemas_dir: PathBuf,
    /// How often each instance checks PostgreSQL for template versions activated through
    /// the API (on another instance); a change applies within this plus one reload.
    pub refresh: Duration,
}

impl TemplateSettings {
    fn load(layers: &Layers, raw: RawTemplates) -> Result<Self, ConfigError> {
        let dir = layers.required("HERALD_TEMPLATES_DIR", "templates.dir", raw.dir)?;
        let schemas_dir = layers.required(
            "HERALD_SCHEMAS_DIR",
            "templates.schemas_dir",
            raw.schemas_dir,
        )?;
        let refresh = layers.required(
            "HERALD_TEMPLATES_REFRESH_MS",
            "templates.refresh_ms",
            raw.refresh_ms.map(|n| n.to_string()),
        )?;
        Ok(TemplateSettings {
            dir: PathBuf::from(dir.text),
            schemas_dir: PathBuf::from(schemas_dir.text),
            // At most 4 s, so that with a reload an edit reaches every instance within the
            // 5 s the API promises.
            refresh: Duration::from_millis(u64::from(
                refresh.u32_in(1..=4000, "whole milliseconds from 1 to 4000")?,
            )),
        })
    }
}

/// The HTTP listener.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Address to bind; port 0 picks a free port (tests use it).
    pub addr: SocketAddr,
    /// Where `/metrics` is served instead of `addr`, so it can stay off a public port.
    pub metrics_addr: Option<SocketAddr>,
    /// API requests handled at once per instance; beyond it the API answers 503 at once
    /// rather than queueing work nobody may wait for.
    pub max_concurrent_requests: usize,
    /// Longest an API request may take to produce its response.
    pub request_timeout: Duration,
}

impl HttpSettings {
    fn load(layers: &Layers, raw: RawHttp) -> Result<Self, ConfigError> {
        let addr = layers.required("HERALD_HTTP_ADDR", "http.addr", raw.addr)?;
        let metrics_addr =
            layers.optional("HERALD_METRICS_ADDR", "http.metrics_addr", raw.metrics_addr);
        let concurrency = layers.required(
            "HERALD_HTTP_MAX_CONCURRENT_REQUESTS",
            "http.max_concurrent_requests",
            raw.max_concurrent_requests.map(|n| n.to_string()),
        )?;
        let timeout = layers.required(
            "HERALD_HTTP_REQUEST_TIMEOUT_SECS",
            "http.request_timeout_secs",
            raw.request_timeout_secs.map(|n| n.to_string()),
        )?;
        const ADDR: &str = "an IP address and port such as 127.0.0.1:8080";
        Ok(HttpSettings {
            addr: addr.parse_with(ADDR)?,
            metrics_addr: metrics_addr
                .filter(Value::is_set)
                .map(|v| v.parse_with(ADDR))
                .transpose()?,
            max_concurrent_requests: concurrency.positive_u32("a whole number above 0")? as usize,
            request_timeout: Duration::from_secs(u64::from(
                timeout.positive_u32("a whole number of seconds above 0")?,
            )),
        })
    }
}

/// Credentials beyond the admin token (DESIGN §5a), and what the API does for browsers.
#[derive(Debug, Clone)]
pub struct AccessSettings {
    /// The HS256 secret of end-user tokens; `None`: user tokens are refused.
    pub user_token_secret: Option<SecretString>,
    /// How long an Idempotency-Key is remembered.
    pub idempotency_ttl: Duration,
    /// Origins whose pages may call the API (CORS); empty: none.
    pub cors_allowed_origins: Vec<String>,
}

impl AccessSettings {
    fn load(layers: &Layers, raw: RawAccess) -> Result<Self, ConfigError> {
        let secret = layers.optional(
            "HERALD_USER_TOKEN_SECRET",
            "access.user_token_secret",
            raw.user_token_secret,
        );
        let ttl = layers.required(
            "HERALD_IDEMPOTENCY_TTL",
            "access.idempotency_ttl",
            raw.idempotency_ttl,
        )?;
        let origins = layers.optional(
            "HERALD_CORS_ALLOWED_ORIGINS",
            "access.cors_allowed_origins",
            raw.cors_allowed_origins,
        );
        let user_token_secret = match secret.filter(Value::is_set) {
            // A short HS256 secret can be brute-forced from one token.
            Some(v) if v.text.trim().len() < 32 => {
                return Err(v.invalid_secret("a secret of at least 32 characters"));
            }
            Some(v) => Some(SecretString::from(v.text.trim().to_owned())),
            None => None,
        };
        Ok(AccessSettings {
            user_token_secret,
            idempotency_ttl: ttl.duration()?,
            cors_allowed_origins: match origins {
                Some(v) => v.origins()?,
                None => Vec::new(),
            },
        })
    }
}

/// The PostgreSQL connection.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/database`; secret because it may hold a password.
    pub url: SecretString,
    /// Upper bound of the workers' connection pool (ingest, dispatch, relay, projector).
    pub max_connections: u32,
    /// Upper bound of the API's own pool: a flood of requests waits for these and cannot
    /// take the connections the workers record sends with.
    pub api_max_connections: u32,
}

impl DatabaseSettings {
    fn load(layers: &Layers, raw: RawDatabase) -> Result<Self, ConfigError> {
        let url = layers.required("HERALD_DATABASE_URL", "database.url", raw.url)?;
        let max_connections = layers.required(
            "HERALD_DATABASE_MAX_CONNECTIONS",
            "database.max_connections",
            raw.max_connections.map(|n| n.to_string()),
        )?;
        let api_max_connections = layers.required(
            "HERALD_DATABASE_API_MAX_CONNECTIONS",
            "database.api_max_connections",
            raw.api_max_connections.map(|n| n.to_string()),
        )?;
        Ok(DatabaseSettings {
            url: SecretString::from(
                url.secret_url(&["postgres", "postgresql"], "a postgres:// URL")?
                    .to_string(),
            ),
            max_connections: max_connections
                .positive_u32("a whole number of connections above 0")?,
            api_max_connections: api_max_connections
                .positive_u32("a whole number of connections above 0")?,
        })
    }
}

/// The Kafka cluster and the topics Herald uses on it.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` bootstrap list, as librdkafka expects it.
    pub brokers: String,
    /// Prepended to every topic name.
    pub topic_prefix: String,
    /// Consumer group session timeout.
    pub session_timeout_ms: u32,
    /// The longest an ingest consumer's fetch waits at the broker for new messages.
    pub fetch_wait_ms: u32,
    /// The same for the consumers of Herald's own topics (read model, webhooks, dead
    /// letters), which no event's latency waits on.
    pub internal_fetch_wait_ms: u32,
    /// Path of the topic catalogue (partition counts, replication factor).
    pub topics_file: PathBuf,
    /// librdkafka properties for every client (TLS, SASL...), as Vector's
    /// `librdkafka_options`: `[kafka.librdkafka_options]` in the file, then
    /// `HERALD_KAFKA_LIBRDKAFKA_OPTIONS="key=value,..."` on top. Never secrets.
    pub librdkafka_options: BTreeMap<String, String>,
    /// Secret librdkafka properties (`sasl.password`...), from their own variables only.
    pub librdkafka_secrets: BTreeMap<&'static str, SecretString>,
    /// How Herald's consumer groups keep and heal their membership.
    pub consumer: ConsumerSettings,
}

impl KafkaSettings {
    fn load(layers: &Layers, raw: RawKafka) -> Result<Self, ConfigError> {
        let brokers = layers.required("HERALD_KAFKA_BROKERS", "kafka.brokers", raw.brokers)?;
        let topic_prefix = layers
            .optional(
                "HERALD_TOPIC_PREFIX",
                "kafka.topic_prefix",
                raw.topic_prefix,
            )
            .unwrap_or_else(|| Value::defaulted(""));
        let session_timeout = layers.required(
            "HERALD_KAFKA_SESSION_TIMEOUT_MS",
            "kafka.session_timeout_ms",
            raw.session_timeout_ms.map(|n| n.to_string()),
        )?;
        let fetch_wait = layers.required(
            "HERALD_KAFKA_FETCH_WAIT_MS",
            "kafka.fetch_wait_ms",
            raw.fetch_wait_ms.map(|n| n.to_string()),
        )?;
        let internal_fetch_wait = layers.required(
            "HERALD_KAFKA_INTERNAL_FETCH_WAIT_MS",
            "kafka.internal_fetch_wait_ms",
            raw.internal_fetch_wait_ms.map(|n| n.to_string()),
        )?;
        let topics_file = layers.required(
            "HERALD_KAFKA_TOPICS_FILE",
            "kafka.topics_file",
            raw.topics_file,
        )?;
        let session_timeout_ms =
            session_timeout.positive_u32("a whole number of milliseconds above 0")?;
        let consumer = ConsumerSettings::load(layers, raw.consumer, session_timeout_ms)?;
        let (librdkafka_options, librdkafka_secrets) =
            layers.librdkafka_options(raw.librdkafka_options)?;
        Ok(KafkaSettings {
            brokers: brokers.broker_list()?,
            topic_prefix: topic_prefix.topic_prefix()?,
            session_timeout_ms,
            fetch_wait_ms: fetch_wait.u32_in(
                1..=300_000,
                "a whole number of milliseconds from 1 to 300000",
            )?,
            internal_fetch_wait_ms: internal_fetch_wait.u32_in(
                1..=300_000,
                "a whole number of milliseconds from 1 to 300000",
            )?,
            topics_file: PathBuf::from(topics_file.text),
            librdkafka_options,
            librdkafka_secrets,
            consumer,
        })
    }
}

/// Consumer group membership: the watchdog's bound and the poll interval librdkafka
/// enforces (`[kafka.consumer]`).
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// How long a consumer may stay without an assignment before readiness reports it
    /// stuck and the consumer is closed and made again.
    pub assignment_timeout: Duration,
    /// librdkafka's `max.poll.interval.ms`: a consumer that does not poll for this long
    /// leaves its group. Herald keeps polling while a batch waits on a dependency, so this
    /// only bites a wedged consumer.
    pub max_poll_interval: Duration,
}

impl ConsumerSettings {
    fn load(
        layers: &Layers<'_>,
        raw: RawConsumer,
        session_timeout_ms: u32,
    ) -> Result<Self, ConfigError> {
        let assignment_timeout = layers.required(
            "HERALD_KAFKA_ASSIGNMENT_TIMEOUT_MS",
            "kafka.consumer.assignment_timeout_ms",
            raw.assignment_timeout_ms.map(|n| n.to_string()),
        )?;
        let max_poll_interval = layers.required(
            "HERALD_KAFKA_MAX_POLL_INTERVAL_MS",
            "kafka.consumer.max_poll_interval_ms",
            raw.max_poll_interval_ms.map(|n| n.to_string()),
        )?;
        let millis = |n: u32| Duration::from_millis(u64::from(n));
        Ok(ConsumerSettings {
            assignment_timeout: millis(
                assignment_timeout.positive_u32("a whole number of milliseconds above 0")?,
            ),
            // librdkafka refuses a poll interval shorter than the session timeout.
            max_poll_interval: millis(max_poll_interval.u32_in(
                session_timeout_ms.max(1)..=86_400_000,
                "whole milliseconds, at least the session timeout (HERALD_KAFKA_SESSION_TIMEOUT_MS), at most 86400000",
            )?),
        })
    }
}

/// The Redis connection.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://[:password@]host:port[/db]`; secret because it may hold a password.
    pub url: SecretString,
    /// Prepended to every Redis key and channel, so deployments (and tests) sharing one
    /// Redis do not see each other's data.
    pub key_prefix: String,
}

impl RedisSettings {
    fn load(layers: &Layers, raw: RawRedis) -> Result<Self, ConfigError> {
        let url = layers.required("HERALD_REDIS_URL", "redis.url", raw.url)?;
        let key_prefix = layers.required(
            "HERALD_REDIS_KEY_PREFIX",
            "redis.key_prefix",
            raw.key_prefix,
        )?;
        Ok(RedisSettings {
            url: SecretString::from(
                url.secret_url(&["redis", "rediss"], "a redis:// or rediss:// URL")?
                    .to_string(),
            ),
            key_prefix: key_prefix.key_prefix()?,
        })
    }
}

/// Outgoing email.
#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// `smtp://host:port` or `smtps://host:port`; `None` disables the EMAIL channel.
    pub url: Option<SecretString>,
    /// The From header of every email.
    pub from: String,
}

impl SmtpSettings {
    fn load(layers: &Layers, raw: RawSmtp) -> Result<Self, ConfigError> {
        let url = layers.optional("HERALD_SMTP_URL", "smtp.url", raw.url);
        let from = layers.required("HERALD_SMTP_FROM", "smtp.from", raw.from)?;
        let insecure_auth = layers
            .optional(
                "HERALD_SMTP_ALLOW_INSECURE_AUTH",
                "smtp.allow_insecure_auth",
                raw.allow_insecure_auth.map(|b| b.to_string()),
            )
            .map(|v| v.flag())
            .transpose()?
            .unwrap_or(false);
        Ok(SmtpSettings {
            url: url
                .filter(Value::is_set)
                .map(|v| v.smtp_url(insecure_auth))
                .transpose()?,
            from: from.mailbox()?,
        })
    }
}

/// Bounds on the API's heavy or long-lived requests.
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// In-app streams (SSE) one user may hold open on one instance; 429 beyond.
    pub streams_per_user: usize,
    /// In-app streams one instance holds open; 503 beyond.
    pub streams_per_instance: usize,
    /// User imports one instance parses at once; 503 beyond.
    pub concurrent_imports: usize,
}

/// Endpoints of the HTTP channels; `None` disables a channel.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// Slack incoming webhook; secret because the URL itself is the credential.
    pub slack_webhook_url: Option<SecretString>,
    pub sms_gateway_url: Option<Url>,
    pub kakaotalk_gateway_url: Option<Url>,
    pub push_gateway_url: Option<Url>,
    /// Per channel: the Standard Webhooks secret (`whsec_<base64>`) that signs its
    /// provider's receipts (`HERALD_SMS_RECEIPT_SECRET`, `HERALD_KAKAOTALK_RECEIPT_SECRET`,
    /// `HERALD_PUSH_RECEIPT_SECRET`, `HERALD_EMAIL_BOUNCE_SECRET`). A channel without one
    /// refuses receipts.
    pub receipt_secrets: BTreeMap<Channel, SecretString>,
    /// Per gateway channel without callbacks: the URL Herald polls for a sent message's
    /// receipt, with `{messageId}` where the message id goes (`HERALD_SMS_STATUS_URL`, ...).
    pub status_urls: BTreeMap<Channel, String>,
    /// The waits between polls of a status URL; the last repeats.
    pub receipt_poll_backoff: Vec<Duration>,
    /// How long a message is polled for before Herald gives up on its receipt.
    pub receipt_poll_deadline: Duration,
}

impl ChannelSettings {
    fn load(layers: &Layers, raw: RawChannels) -> Result<Self, ConfigError> {
        let slack = layers.optional(
            "HERALD_SLACK_WEBHOOK_URL",
            "channels.slack_webhook_url",
            raw.slack_webhook_url,
        );
        let gateway = |var, key, raw: Option<String>| {
            layers
                .optional(var, key, raw)
                .filter(Value::is_set)
                .map(Value::http_url)
                .transpose()
        };
        let mut status_urls = BTreeMap::new();
        for (channel, var, key, raw) in [
            (
                Channel::Sms,
                "HERALD_SMS_STATUS_URL",
                "channels.sms_status_url",
                raw.sms_status_url,
            ),
            (
                Channel::Kakaotalk,
                "HERALD_KAKAOTALK_STATUS_URL",
                "channels.kakaotalk_status_url",
                raw.kakaotalk_status_url,
            ),
            (
                Channel::Push,
                "HERALD_PUSH_STATUS_URL",
                "channels.push_status_url",
                raw.push_status_url,
            ),
        ] {
            if let Some(value) = layers.optional(var, key, raw).filter(Value::is_set) {
                status_urls.insert(channel, value.status_url()?);
            }
        }
        let poll_backoff = layers.required(
            "HERALD_RECEIPT_POLL_BACKOFF_MS",
            "channels.receipt_poll_backoff_ms",
            raw.receipt_poll_backoff_ms
                .map(|v| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")),
        )?;
        let poll_deadline = layers.required(
            "HERALD_RECEIPT_POLL_DEADLINE",
            "channels.receipt_poll_deadline",
            raw.receipt_poll_deadline,
        )?;
        Ok(ChannelSettings {
            slack_webhook_url: match slack.filter(Value::is_set) {
                Some(v) => Some(SecretString::from(
                    v.secret_url(&["http", "https"], "an http(s):// webhook URL")?
                        .to_string(),
                )),
                None => None,
            },
            sms_gateway_url: gateway(
                "HERALD_SMS_GATEWAY_URL",
                "channels.sms_gateway_url",
                raw.sms_gateway_url,
            )?,
            kakaotalk_gateway_url: gateway(
                "HERALD_KAKAOTALK_GATEWAY_URL",
                "channels.kakaotalk_gateway_url",
                raw.kakaotalk_gateway_url,
            )?,
            push_gateway_url: gateway(
                "HERALD_PUSH_GATEWAY_URL",
                "channels.push_gateway_url",
                raw.push_gateway_url,
            )?,
            receipt_secrets: receipt_secrets(layers)?,
            status_urls,
            receipt_poll_backoff: poll_backoff.millis_list()?,
            receipt_poll_deadline: poll_deadline.duration()?,
        })
    }
}

/// The receipt endpoints' Standard Webhooks secrets, from the environment only.
fn receipt_secrets(layers: &Layers) -> Result<BTreeMap<Channel, SecretString>, ConfigError> {
    let mut secrets = BTreeMap::new();
    for (channel, var) in [
        (Channel::Sms, "HERALD_SMS_RECEIPT_SECRET"),
        (Channel::Kakaotalk, "HERALD_KAKAOTALK_RECEIPT_SECRET"),
        (Channel::Push, "HERALD_PUSH_RECEIPT_SECRET"),
        (Channel::Email, "HERALD_EMAIL_BOUNCE_SECRET"),
    ] {
        if let Some(secret) = (layers.env)(var).filter(|k| !k.trim().is_empty()) {
            if standardwebhooks::Webhook::new(secret.trim()).is_err() {
                return Err(ConfigError::Invalid {
                    origin: var.to_owned(),
                    expected: "a Standard Webhooks secret: whsec_ followed by base64",
                    value: None,
                });
            }
            secrets.insert(channel, SecretString::from(secret.trim().to_owned()));
        }
    }
    Ok(secrets)
}

/// The admin API.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Bearer token; `None` disables the admin API.
    pub token: Option<SecretString>,
}

impl AdminSettings {
    fn load(layers: &Layers, raw: RawAdmin) -> Self {
        let token = layers.optional("HERALD_ADMIN_TOKEN", "admin.token", raw.token);
        AdminSettings {
            token: token
                .filter(Value::is_set)
                .map(|v| SecretString::from(v.text)),
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    /// How long in-flight work may take after a stop signal.
    pub grace_period: Duration,
}

impl ShutdownSettings {
    fn load(layers: &Layers, raw: RawShutdown) -> Result<Self, ConfigError> {
        let grace = layers.required(
            "HERALD_SHUTDOWN_GRACE_PERIOD_SECS",
            "shutdown.grace_period_secs",
            raw.grace_period_secs.map(|n| n.to_string()),
        )?;
        Ok(ShutdownSettings {
            grace_period: Duration::from_secs(u64::from(
                grace.positive_u32("a whole number of seconds above 0")?,
            )),
        })
    }
}

/// Why settings could not be loaded. The `Display` form is one line meant for a person.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (set HERALD_CONFIG_FILE to another file)")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("invalid {origin}: expected {expected}{}", shown(.value))]
    Invalid {
        origin: String,
        expected: &'static str,
        /// The offending value, or `None` when it may be a secret.
        value: Option<String>,
    },
    #[error("invalid {origin}: librdkafka option {key:?} is refused: {reason}")]
    KafkaOption {
        origin: String,
        key: String,
        reason: String,
    },
}

/// Secret librdkafka properties and the variables that set them. They are never taken from
/// `librdkafka_options`, whose values appear in errors and `Debug` output.
pub const LIBRDKAFKA_SECRETS: [(&str, &str); 3] = [
    ("sasl.password", "HERALD_KAFKA_SASL_PASSWORD"),
    ("ssl.key.password", "HERALD_KAFKA_SSL_KEY_PASSWORD"),
    (
        "sasl.oauthbearer.client.secret",
        "HERALD_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
    ),
];

/// librdkafka properties that hold secrets (or key material) by their name.
fn is_secret_option(key: &str) -> bool {
    key.contains("password")
        || key.contains("secret")
        || matches!(key, "ssl.key.pem" | "ssl_key" | "sasl.oauthbearer.config")
}

fn shown(value: &Option<String>) -> String {
    match value {
        Some(value) => format!(", got {value:?}"),
        None => String::new(),
    }
}

impl Settings {
    /// Loads the file named by `HERALD_CONFIG_FILE` (or [`DEFAULT_CONFIG_FILE`]) and applies
    /// the process environment on top.
    pub fn load() -> Result<Self, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let file = env("HERALD_CONFIG_FILE").unwrap_or_else(|| DEFAULT_CONFIG_FILE.to_owned());
        Self::load_from(Path::new(&file), &env)
    }

    /// Loads `file` and applies the variables that `env` returns on top. Tests pass their own
    /// `env` instead of mutating the process environment.
    pub fn load_from(
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::ReadFile {
            path: file.to_owned(),
            source,
        })?;
        let raw: RawSettings = toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
            path: file.to_owned(),
            message: e.message().to_owned(),
        })?;
        let layers = Layers { file, env };
        Ok(Settings {
            http: HttpSettings::load(&layers, raw.http)?,
            database: DatabaseSettings::load(&layers, raw.database)?,
            kafka: KafkaSettings::load(&layers, raw.kafka)?,
            redis: RedisSettings::load(&layers, raw.redis)?,
            smtp: SmtpSettings::load(&layers, raw.smtp)?,
            limits: layers.limits(raw.limits)?,
            channels: ChannelSettings::load(&layers, raw.channels)?,
            admin: AdminSettings::load(&layers, raw.admin),
            access: AccessSettings::load(&layers, raw.access)?,
            shutdown: ShutdownSettings::load(&layers, raw.shutdown)?,
            ingest: IngestSettings::load(&layers, raw.ingest)?,
            templates: TemplateSettings::load(&layers, raw.templates)?,
            dispatch: DispatchSettings::load(&layers, raw.dispatch)?,
            read_model: ReadModelSettings::load(&layers, raw.read_model)?,
            broadcast: BroadcastSettings::load(&layers, raw.broadcast)?,
            retention: RetentionSettings::load(&layers, raw.retention)?,
            webhooks: WebhookSettings::load(&layers, raw.webhooks)?,
            dlq: DlqSettings::load(&layers, raw.dlq)?,
            alerts: AlertSettings::load(&layers, raw.alerts)?,
        })
    }

    /// The PostgreSQL URL, for the code that connects.
    pub fn database_url(&self) -> &str {
        self.database.url.expose_secret()
    }
}

/// Parses a duration such as `90s`, `15m`, `24h` or `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 15m, 1h or 7d"))?;
    let unit_secs = match unit.trim() {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    match n.checked_mul(unit_secs) {
        Some(secs) if secs > 0 && secs <= 10 * 365 * 86_400 => Ok(Duration::from_secs(secs)),
        _ => Err(format!("{text:?} must be above 0 and at most 10 years")),
    }
}

/// The shape of the config file. Unknown keys are an error, so a typo does not silently
/// leave a default in force.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSettings {
    http: RawHttp,
    database: RawDatabase,
    kafka: RawKafka,
    redis: RawRedis,
    smtp: RawSmtp,
    limits: RawLimits,
    channels: RawChannels,
    admin: RawAdmin,
    access: RawAccess,
    shutdown: RawShutdown,
    ingest: RawIngest,
    templates: RawTemplates,
    dispatch: RawDispatch,
    read_model: RawReadModel,
    broadcast: RawBroadcast,
    retention: RawRetention,
    webhooks: RawWebhooks,
    dlq: RawDlq,
    alerts: RawAlerts,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDlq {
    replay_cap: Option<u32>,
    replay_rate: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAlerts {
    enabled: Option<bool>,
    interval: Option<String>,
    resolve_after: Option<String>,
    success_rate_min: Option<f64>,
    success_rate_window: Option<String>,
    success_rate_min_sends_per_second: Option<f64>,
    success_rate_for: Option<String>,
    pending_max: Option<u32>,
    pending_for: Option<String>,
    send_p99_max: Option<String>,
    send_p99_window: Option<String>,
    send_p99_for: Option<String>,
    dead_letters_max: Option<u32>,
    dead_letters_window: Option<String>,
    dead_letters_for: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWebhooks {
    allow_private: Option<bool>,
    backoff_ms: Option<Vec<u32>>,
    give_up_after: Option<String>,
    disable_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetention {
    history: Option<String>,
    dead_letters: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBroadcast {
    batch_size: Option<u32>,
    dispatch_share: Option<f64>,
    max_queued_deliveries: Option<u32>,
    lease_secs: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawReadModel {
    reporting_timezone: Option<String>,
    projector_linger_ms: Option<u32>,
    projector_batch_max_messages: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDispatch {
    concurrency: Option<u32>,
    claim_batch: Option<u32>,
    lease_secs: Option<u32>,
    send_timeout_secs: Option<u32>,
    quick_send_ms: Option<u32>,
    max_retries: Option<u32>,
    retry_backoff_ms: Option<Vec<u32>>,
    retry_jitter: Option<f64>,
    breaker_failure_threshold: Option<u32>,
    breaker_cooldown_secs: Option<u32>,
    rate_limits: BTreeMap<Channel, String>,
    #[serde(deserialize_with = "per_channel_text")]
    channel_concurrency: BTreeMap<Channel, String>,
    fallbacks: BTreeMap<Channel, Channel>,
}

/// A per-channel table whose values may be numbers or strings in the file.
fn per_channel_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<Channel, String>, D::Error> {
    let values: BTreeMap<Channel, toml::Value> = Deserialize::deserialize(deserializer)?;
    Ok(values
        .into_iter()
        .map(|(channel, value)| {
            let text = match value {
                toml::Value::String(text) => text,
                other => other.to_string(),
            };
            (channel, text)
        })
        .collect())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawIngest {
    routing_file: Option<String>,
    batch_max_messages: Option<u32>,
    batch_max_wait_ms: Option<u32>,
    max_event_bytes: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTemplates {
    dir: Option<String>,
    schemas_dir: Option<String>,
    refresh_ms: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
    addr: Option<String>,
    metrics_addr: Option<String>,
    max_concurrent_requests: Option<u32>,
    request_timeout_secs: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAccess {
    user_token_secret: Option<String>,
    idempotency_ttl: Option<String>,
    cors_allowed_origins: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDatabase {
    url: Option<String>,
    max_connections: Option<u32>,
    api_max_connections: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawKafka {
    brokers: Option<String>,
    topic_prefix: Option<String>,
    session_timeout_ms: Option<u32>,
    fetch_wait_ms: Option<u32>,
    internal_fetch_wait_ms: Option<u32>,
    topics_file: Option<String>,
    librdkafka_options: BTreeMap<String, toml::Value>,
    consumer: RawConsumer,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConsumer {
    assignment_timeout_ms: Option<u32>,
    max_poll_interval_ms: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRedis {
    url: Option<String>,
    key_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSmtp {
    url: Option<String>,
    from: Option<String>,
    allow_insecure_auth: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    streams_per_user: Option<u32>,
    streams_per_instance: Option<u32>,
    concurrent_imports: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawChannels {
    slack_webhook_url: Option<String>,
    sms_gateway_url: Option<String>,
    kakaotalk_gateway_url: Option<String>,
    push_gateway_url: Option<String>,
    sms_status_url: Option<String>,
    kakaotalk_status_url: Option<String>,
    push_status_url: Option<String>,
    receipt_poll_backoff_ms: Option<Vec<u32>>,
    receipt_poll_deadline: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawShutdown {
    grace_period_secs: Option<u32>,
}

/// Picks each value from the environment first, then the file.
struct Layers<'a> {
    file: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Layers<'_> {
    /// `[kafka.librdkafka_options]`, then `HERALD_KAFKA_LIBRDKAFKA_OPTIONS` entry by entry
    /// on top, plus the secrets of [`LIBRDKAFKA_SECRETS`]. librdkafka itself checks every
    /// name and value here, so a typo stops startup naming the option.
    #[allow(clippy::type_complexity)]
    fn librdkafka_options(
        &self,
        file_options: BTreeMap<String, toml::Value>,
    ) -> Result<
        (
            BTreeMap<String, String>,
            BTreeMap<&'static str, SecretString>,
        ),
        ConfigError,
    > {
        const VAR: &str = "HERALD_KAFKA_LIBRDKAFKA_OPTIONS";
        // key -> (value, origin)
        let mut options: BTreeMap<String, (String, String)> = file_options
            .into_iter()
            .map(|(key, value)| {
                let text = match value {
                    toml::Value::String(text) => text,
                    other => other.to_string(),
                };
                let origin = format!(
                    "kafka.librdkafka_options in {} (override with {VAR})",
                    self.file.display()
                );
                (key, (text, origin))
            })
            .collect();
        for entry in (self.env)(VAR).unwrap_or_default().split(',') {
            if entry.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = entry.split_once('=') else {
                return Err(ConfigError::Invalid {
                    origin: VAR.to_owned(),
                    expected: "comma-separated librdkafka key=value pairs such as \
                               security.protocol=SASL_SSL,sasl.mechanism=SCRAM-SHA-512",
                    value: None,
                });
            };
            options.insert(
                key.trim().to_owned(),
                (value.trim().to_owned(), VAR.to_owned()),
            );
        }
        let refuse = |key: &str, origin: &str, reason: String| ConfigError::KafkaOption {
            origin: origin.to_owned(),
            key: key.to_owned(),
            reason,
        };
        for (key, (_, origin)) in &options {
            if is_secret_option(key) {
                let variables: Vec<&str> = LIBRDKAFKA_SECRETS.iter().map(|(_, v)| *v).collect();
                return Err(refuse(
                    key,
                    origin,
                    format!(
                        "it holds a secret; set it through {} (or a file path option)",
                        variables.join(", ")
                    ),
                ));
            }
            if matches!(key.as_str(), "bootstrap.servers" | "metadata.broker.list") {
                return Err(refuse(key, origin, "set HERALD_KAFKA_BROKERS".to_owned()));
            }
        }
        let secrets: BTreeMap<&'static str, SecretString> = LIBRDKAFKA_SECRETS
            .iter()
            .filter_map(|(key, var)| {
                let value = (self.env)(var).filter(|v| !v.is_empty())?;
                Some((*key, SecretString::from(value)))
            })
            .collect();

        let mut check = rdkafka::ClientConfig::new();
        for (key, (value, _)) in &options {
            check.set(key, value);
        }
        for (key, value) in &secrets {
            check.set(*key, value.expose_secret());
        }
        if let Err(error) = check.create_native_config() {
            let (key, reason) = match error {
                rdkafka::error::KafkaError::ClientConfig(_, description, key, _) => {
                    (key, description)
                }
                other => (String::new(), other.to_string()),
            };
            return Err(match options.get(&key) {
                Some((_, origin)) => refuse(&key, origin, reason),
                // A secret's value is never repeated, whatever librdkafka says of it.
                None => {
                    let var = LIBRDKAFKA_SECRETS
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map_or(VAR, |(_, v)| *v);
                    refuse(&key, var, "librdkafka refuses its value".to_owned())
                }
            });
        }
        let options = options
            .into_iter()
            .map(|(key, (value, _))| (key, value))
            .collect();
        Ok((options, secrets))
    }

    /// The `[limits]` section; every bound has a built-in default.
    fn limits(&self, raw: RawLimits) -> Result<LimitSettings, ConfigError> {
        let bound = |var: &'static str, key: &'static str, file: Option<u32>, default: u32| {
            self.optional(var, key, file.map(|n| n.to_string()))
                .unwrap_or_else(|| Value::defaulted(&default.to_string()))
                .positive_u32("a whole number above 0")
                .map(|n| n as usize)
        };
        Ok(LimitSettings {
            streams_per_user: bound(
                "HERALD_STREAMS_PER_USER",
                "limits.streams_per_user",
                raw.streams_per_user,
                5,
            )?,
            streams_per_instance: bound(
                "HERALD_STREAMS_PER_INSTANCE",
                "limits.streams_per_instance",
                raw.streams_per_instance,
                10_000,
            )?,
            concurrent_imports: bound(
                "HERALD_CONCURRENT_IMPORTS",
                "limits.concurrent_imports",
                raw.concurrent_imports,
                2,
            )?,
        })
    }

    /// A per-channel section of the file, each entry overridden by `{prefix}_{CHANNEL}`,
    /// plus the channels only the environment names. Empty values are left out.
    fn per_channel(
        &self,
        prefix: &str,
        section: &str,
        file_values: BTreeMap<Channel, String>,
    ) -> Vec<(Channel, Value)> {
        Channel::ALL
            .into_iter()
            .filter_map(|channel| {
                let var = format!("{prefix}_{channel}");
                let value = match ((self.env)(&var), file_values.get(&channel)) {
                    (Some(text), _) => Value { text, origin: var },
                    (None, Some(text)) => Value {
                        text: text.clone(),
                        origin: format!("{section}.{channel} in {}", self.file.display()),
                    },
                    (None, None) => return None,
                };
                value.is_set().then_some((channel, value))
            })
            .collect()
    }

    fn optional(
        &self,
        var: &'static str,
        key: &'static str,
        file_value: Option<String>,
    ) -> Option<Value> {
        if let Some(text) = (self.env)(var) {
            return Some(Value {
                text,
                origin: var.to_owned(),
            });
        }
        file_value.map(|text| Value {
            text,
            origin: format!("{key} in {} (override with {var})", self.file.display()),
        })
    }

    fn required(
        &self,
        var: &'static str,
        key: &'static str,
        file_value: Option<String>,
    ) -> Result<Value, ConfigError> {
        self.optional(var, key, file_value)
            .ok_or_else(|| ConfigError::Invalid {
                origin: format!("{var} ({key} is missing from {})", self.file.display()),
                expected: "a value",
                value: None,
            })
    }
}

/// One raw setting and where it came from.
struct Value {
    text: String,
    origin: String,
}

impl Value {
    fn defaulted(text: &str) -> Self {
        Value {
            text: text.to_owned(),
            origin: "built-in default".to_owned(),
        }
    }

    fn is_set(&self) -> bool {
        !self.text.trim().is_empty()
    }

    fn invalid(&self, expected: &'static str) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.clone(),
            expected,
            value: Some(self.text.clone()),
        }
    }

    fn invalid_secret(&self, expected: &'static str) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.clone(),
            expected,
            value: None,
        }
    }

    fn parse_with<T: std::str::FromStr>(&self, expected: &'static str) -> Result<T, ConfigError> {
        self.text.trim().parse().map_err(|_| self.invalid(expected))
    }

    fn positive_u32(&self, expected: &'static str) -> Result<u32, ConfigError> {
        self.u32_in(1..=u32::MAX, expected)
    }

    fn u32_in(
        &self,
        range: std::ops::RangeInclusive<u32>,
        expected: &'static str,
    ) -> Result<u32, ConfigError> {
        let n = self.parse_with::<u32>(expected)?;
        if range.contains(&n) {
            Ok(n)
        } else {
            Err(self.invalid(expected))
        }
    }

    /// A URL that may carry credentials: the error never repeats the value.
    fn secret_url(&self, schemes: &[&str], expected: &'static str) -> Result<Url, ConfigError> {
        let url = Url::parse(self.text.trim()).map_err(|_| self.invalid_secret(expected))?;
        if !schemes.contains(&url.scheme()) || url.host_str().is_none_or(str::is_empty) {
            return Err(self.invalid_secret(expected));
        }
        Ok(url)
    }

    /// A status URL template: http(s), with `{messageId}` where the message id goes (or, without
    /// it, `?messageId=` is added).
    fn status_url(self) -> Result<String, ConfigError> {
        let text = self.text.trim().to_owned();
        let expected = "an http(s):// URL with {messageId} where the message id goes";
        let sample = text.replace("{messageId}", "m");
        match Url::parse(&sample) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
                Ok(text)
            }
            _ => Err(self.invalid(expected)),
        }
    }

    fn flag(self) -> Result<bool, ConfigError> {
        match self.text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" | "" => Ok(false),
            _ => Err(self.invalid("true or false")),
        }
    }

    /// `smtps://` (implicit TLS), `smtp://...?tls=required` (STARTTLS) or plain `smtp://`.
    /// Credentials go only over TLS unless `allow_insecure_auth` says otherwise.
    fn smtp_url(self, allow_insecure_auth: bool) -> Result<SecretString, ConfigError> {
        let url = self.secret_url(
            &["smtp", "smtps"],
            "an smtp://host:port, smtp://host:port?tls=required or smtps://host:port URL",
        )?;
        let mut starttls = false;
        for (key, value) in url.query_pairs() {
            match (key.as_ref(), value.as_ref()) {
                ("tls", "required") => starttls = true,
                _ => {
                    return Err(self.invalid_secret(
                        "no query parameter but tls=required (STARTTLS) in the SMTP URL",
                    ));
                }
            }
        }
        let credentials = !url.username().is_empty() || url.password().is_some();
        if credentials && url.scheme() == "smtp" && !starttls && !allow_insecure_auth {
            return Err(self.invalid_secret(
                "TLS when the SMTP URL holds credentials: smtps://host:465, or \
                 smtp://host:587?tls=required for STARTTLS \
                 (HERALD_SMTP_ALLOW_INSECURE_AUTH=true sends them in clear text)",
            ));
        }
        Ok(SecretString::from(url.to_string()))
    }

    fn http_url(self) -> Result<Url, ConfigError> {
        const EXPECTED: &str = "an http:// or https:// URL";
        let url = Url::parse(self.text.trim()).map_err(|_| self.invalid(EXPECTED))?;
        if !["http", "https"].contains(&url.scheme()) || url.host_str().is_none() {
            return Err(self.invalid(EXPECTED));
        }
        Ok(url)
    }

    fn broker_list(&self) -> Result<String, ConfigError> {
        const EXPECTED: &str = "a comma-separated list of host:port such as 127.0.0.1:9092";
        let brokers: Vec<&str> = self.text.split(',').map(str::trim).collect();
        let valid = |broker: &str| {
            broker.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && !host.contains(|c: char| c.is_whitespace() || c == '/')
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            })
        };
        if brokers.iter().all(|b| valid(b)) {
            Ok(brokers.join(","))
        } else {
            Err(self.invalid(EXPECTED))
        }
    }

    fn topic_prefix(&self) -> Result<String, ConfigError> {
        const EXPECTED: &str = "at most 100 characters from A-Z a-z 0-9 . _ -";
        let prefix = self.text.trim();
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if prefix.len() <= 100 && prefix.chars().all(legal) {
            Ok(prefix.to_owned())
        } else {
            Err(self.invalid(EXPECTED))
        }
    }

    fn millis_list(&self) -> Result<Vec<Duration>, ConfigError> {
        const EXPECTED: &str = "comma-separated milliseconds such as 1000,2000,4000";
        let delays: Result<Vec<Duration>, _> = self
            .text
            .split(',')
            .map(|part| part.trim().parse::<u64>().map(Duration::from_millis))
            .collect();
        match delays {
            Ok(delays) if !delays.is_empty() => Ok(delays),
            _ => Err(self.invalid(EXPECTED)),
        }
    }

    fn duration(&self) -> Result<Duration, ConfigError> {
        parse_duration(&self.text)
            .map_err(|_| self.invalid("a duration such as 90s, 15m, 24h or 7d"))
    }

    /// A [`Self::duration`] that may also be `0` (an alert's `for`: at once).
    fn duration_or_zero(&self) -> Result<Duration, ConfigError> {
        if matches!(self.text.trim(), "0" | "0s") {
            return Ok(Duration::ZERO);
        }
        parse_duration(&self.text)
            .map_err(|_| self.invalid("a duration such as 0s, 90s, 15m or 24h"))
    }

    /// Comma-separated browser origins (`https://app.example.com`), each exactly as a
    /// browser sends it in `Origin`: a scheme, a host and an optional port, nothing else.
    fn origins(&self) -> Result<Vec<String>, ConfigError> {
        const EXPECTED: &str =
            "comma-separated origins such as https://app.example.com,http://localhost:3000";
        let mut origins = Vec::new();
        for origin in self
            .text
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
        {
            let url = Url::parse(origin).map_err(|_| self.invalid(EXPECTED))?;
            let exact = url.origin().ascii_serialization();
            if !["http", "https"].contains(&url.scheme()) || exact != origin.trim_end_matches('/') {
                return Err(self.invalid(EXPECTED));
            }
            origins.push(exact);
        }
        Ok(origins)
    }

    fn fraction(&self) -> Result<f64, ConfigError> {
        const EXPECTED: &str = "a number from 0 to 1";
        match self.text.trim().parse::<f64>() {
            Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
            _ => Err(self.invalid(EXPECTED)),
        }
    }

    fn rate_limit(&self) -> Result<RateLimit, ConfigError> {
        const EXPECTED: &str = "sends per window in seconds such as 100/60";
        let parsed = self.text.split_once('/').and_then(|(limit, secs)| {
            let limit = limit.trim().parse::<u32>().ok().filter(|n| *n > 0)?;
            let secs = secs.trim().parse::<u64>().ok().filter(|n| *n > 0)?;
            Some(RateLimit {
                limit,
                window: Duration::from_secs(secs),
            })
        });
        parsed.ok_or_else(|| self.invalid(EXPECTED))
    }

    fn key_prefix(&self) -> Result<String, ConfigError> {
        const EXPECTED: &str = "at most 100 characters without spaces, such as herald:";
        let prefix = self.text.trim();
        if prefix.len() <= 100 && !prefix.contains(char::is_whitespace) {
            Ok(prefix.to_owned())
        } else {
            Err(self.invalid(EXPECTED))
        }
    }

    fn mailbox(&self) -> Result<String, ConfigError> {
        const EXPECTED: &str = "an address such as \"Herald <no-reply@example.com>\"";
        let text = self.text.trim();
        let address = match (text.rfind('<'), text.strip_suffix('>')) {
            (Some(open), Some(inner)) => &inner[open + 1..],
            (None, None) => text,
            _ => return Err(self.invalid(EXPECTED)),
        };
        match address.split_once('@') {
            Some((local, domain))
                if !local.is_empty()
                    && !domain.is_empty()
                    && !address.contains(char::is_whitespace) =>
            {
                Ok(text.to_owned())
            }
            _ => Err(self.invalid(EXPECTED)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        Settings::load_from(&manifest.join(DEFAULT_CONFIG_FILE), &|name| {
            vars.get(name).cloned()
        })
    }

    fn error_of(vars: &[(&str, &str)]) -> String {
        load(vars).expect_err("the value is refused").to_string()
    }

    #[test]
    fn the_default_file_gives_the_local_stack_settings() {
        let settings = load(&[]).unwrap();

        assert_eq!(settings.http.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(settings.kafka.topic_prefix, "");
        assert!(settings.smtp.url.is_some());
        assert!(settings.channels.slack_webhook_url.is_none());
        assert!(settings.admin.token.is_none());
    }

    #[test]
    fn environment_variables_override_the_file() {
        let settings = load(&[
            ("HERALD_HTTP_ADDR", "0.0.0.0:9000"),
            ("HERALD_KAFKA_BROKERS", "k1:9092, k2:9093"),
            ("HERALD_TOPIC_PREFIX", "test-1."),
            ("HERALD_SMS_GATEWAY_URL", "https://sms.example.com/send"),
            ("HERALD_SMTP_URL", ""),
        ])
        .unwrap();

        assert_eq!(settings.http.addr.to_string(), "0.0.0.0:9000");
        assert_eq!(settings.kafka.brokers, "k1:9092,k2:9093");
        assert_eq!(settings.kafka.topic_prefix, "test-1.");
        assert_eq!(
            settings.channels.sms_gateway_url.unwrap().as_str(),
            "https://sms.example.com/send"
        );
        assert!(
            settings.smtp.url.is_none(),
            "an empty value disables a channel"
        );
    }

    #[test]
    fn the_consumer_watchdog_bound_and_poll_interval_come_from_the_file_or_the_environment() {
        let settings = load(&[]).unwrap();
        assert_eq!(
            settings.kafka.consumer.assignment_timeout,
            Duration::from_secs(25)
        );
        assert_eq!(
            settings.kafka.consumer.max_poll_interval,
            Duration::from_secs(300)
        );
        let settings = load(&[
            ("HERALD_KAFKA_ASSIGNMENT_TIMEOUT_MS", "1500"),
            ("HERALD_KAFKA_MAX_POLL_INTERVAL_MS", "8000"),
        ])
        .unwrap();
        assert_eq!(
            settings.kafka.consumer.assignment_timeout,
            Duration::from_millis(1500)
        );
        assert_eq!(
            settings.kafka.consumer.max_poll_interval,
            Duration::from_secs(8)
        );
        let message = error_of(&[("HERALD_KAFKA_MAX_POLL_INTERVAL_MS", "5000")]);
        assert!(
            message.starts_with("invalid HERALD_KAFKA_MAX_POLL_INTERVAL_MS")
                && message.contains("at least the session timeout"),
            "{message}"
        );
    }

    #[test]
    fn the_projector_linger_and_batch_cap_come_from_the_file_or_the_environment() {
        let settings = load(&[]).unwrap();
        assert_eq!(
            settings.read_model.projector_linger,
            Duration::from_millis(500)
        );
        assert_eq!(settings.read_model.projector_batch_max_messages, 10_000);
        let settings = load(&[
            ("HERALD_PROJECTOR_LINGER_MS", "20"),
            ("HERALD_PROJECTOR_BATCH_MAX_MESSAGES", "2000"),
        ])
        .unwrap();
        assert_eq!(
            settings.read_model.projector_linger,
            Duration::from_millis(20)
        );
        assert_eq!(settings.read_model.projector_batch_max_messages, 2000);
        let message = error_of(&[("HERALD_PROJECTOR_LINGER_MS", "0")]);
        assert!(
            message.starts_with("invalid HERALD_PROJECTOR_LINGER_MS"),
            "{message}"
        );
    }

    #[test]
    fn a_channel_can_have_its_own_concurrency() {
        let settings = load(&[
            ("HERALD_DISPATCH_CONCURRENCY", "8"),
            ("HERALD_DISPATCH_CONCURRENCY_IN_APP", "64"),
            ("HERALD_KAFKA_FETCH_WAIT_MS", "5"),
            ("HERALD_KAFKA_INTERNAL_FETCH_WAIT_MS", "400"),
        ])
        .unwrap();
        assert_eq!(settings.dispatch.concurrency_of(Channel::InApp), 64);
        assert_eq!(settings.dispatch.concurrency_of(Channel::Email), 8);
        // The file's own: IN_APP above the rest, which follow HERALD_DISPATCH_CONCURRENCY.
        let defaults = load(&[("HERALD_DISPATCH_CONCURRENCY", "8")]).unwrap();
        assert_eq!(defaults.dispatch.concurrency_of(Channel::InApp), 128);
        assert_eq!(defaults.dispatch.concurrency_of(Channel::Slack), 8);
        assert_eq!(settings.kafka.fetch_wait_ms, 5);
        assert_eq!(settings.kafka.internal_fetch_wait_ms, 400);
        assert_eq!(defaults.kafka.internal_fetch_wait_ms, 250);
        let message = error_of(&[("HERALD_DISPATCH_CONCURRENCY_SLACK", "0")]);
        assert!(
            message.starts_with("invalid HERALD_DISPATCH_CONCURRENCY_SLACK"),
            "{message}"
        );
    }

    #[test]
    fn a_bad_http_address_names_the_variable_and_the_expected_form() {
        let message = error_of(&[("HERALD_HTTP_ADDR", "localhost")]);

        assert_eq!(
            message,
            "invalid HERALD_HTTP_ADDR: expected an IP address and port such as \
             127.0.0.1:8080, got \"localhost\""
        );
    }

    #[test]
    fn a_bad_broker_list_names_the_variable() {
        for bad in [
            "",
            "kafka",
            "kafka:0",
            "kafka:99999",
            "a:1,,b:2",
            "tcp://k:9092",
        ] {
            let message = error_of(&[("HERALD_KAFKA_BROKERS", bad)]);
            assert!(
                message.starts_with("invalid HERALD_KAFKA_BROKERS: expected a comma-separated"),
                "{bad:?} gave {message}"
            );
        }
    }

    #[test]
    fn urls_with_credentials_are_refused_without_repeating_them() {
        let message = error_of(&[("HERALD_DATABASE_URL", "mysql://u:hunter2@db/x")]);
        assert!(message.contains("HERALD_DATABASE_URL"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");

        let message = error_of(&[("HERALD_SLACK_WEBHOOK_URL", "hooks.slack.com/T0/B0/secret")]);
        assert!(message.contains("HERALD_SLACK_WEBHOOK_URL"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }

    #[test]
    fn other_bad_values_are_refused_with_their_variable() {
        for (var, bad) in [
            ("HERALD_REDIS_URL", "http://redis:6379"),
            ("HERALD_SMTP_URL", "mail.example.com"),
            ("HERALD_SMTP_FROM", "Herald"),
            ("HERALD_PUSH_GATEWAY_URL", "ftp://push"),
            ("HERALD_TOPIC_PREFIX", "has space"),
            ("HERALD_DATABASE_MAX_CONNECTIONS", "0"),
            ("HERALD_KAFKA_FETCH_WAIT_MS", "300001"),
            ("HERALD_KAFKA_INTERNAL_FETCH_WAIT_MS", "0"),
            ("HERALD_SHUTDOWN_GRACE_PERIOD_SECS", "soon"),
        ] {
            let message = error_of(&[(var, bad)]);
            assert!(message.starts_with(&format!("invalid {var}")), "{message}");
        }
    }

    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let settings = load(&[
            ("HERALD_ADMIN_TOKEN", "admin-token-value"),
            (
                "HERALD_USER_TOKEN_SECRET",
                "user-token-secret-value-0123456789abcdef",
            ),
            (
                "HERALD_DATABASE_URL",
                "postgres://herald:db-password@db/herald",
            ),
            (
                "HERALD_SLACK_WEBHOOK_URL",
                "https://hooks.slack.com/services/T/B/hook-secret",
            ),
        ])
        .unwrap();

        let debug = format!("{settings:?}");
        for secret in [
            "admin-token-value",
            "user-token-secret-value",
            "db-password",
            "hook-secret",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked into {debug}");
        }
    }

    #[test]
    fn access_settings_are_checked_and_a_short_user_token_secret_is_refused_unshown() {
        let settings = load(&[
            ("HERALD_IDEMPOTENCY_TTL", "90m"),
            (
                "HERALD_CORS_ALLOWED_ORIGINS",
                "https://app.example.com, http://localhost:3000",
            ),
        ])
        .unwrap();
        assert_eq!(settings.access.idempotency_ttl, Duration::from_secs(5400));
        assert_eq!(
            settings.access.cors_allowed_origins,
            ["https://app.example.com", "http://localhost:3000"]
        );
        assert!(settings.access.user_token_secret.is_none());
        assert_eq!(
            load(&[]).unwrap().access.idempotency_ttl,
            Duration::from_secs(86_400)
        );

        let short = error_of(&[("HERALD_USER_TOKEN_SECRET", "shortsecret")]);
        assert!(short.contains("HERALD_USER_TOKEN_SECRET"), "{short}");
        assert!(short.contains("32 characters"), "{short}");
        assert!(!short.contains("shortsecret"), "{short}");
        let path = error_of(&[(
            "HERALD_CORS_ALLOWED_ORIGINS",
            "https://app.example.com/page",
        )]);
        assert!(path.contains("HERALD_CORS_ALLOWED_ORIGINS"), "{path}");
        assert!(error_of(&[("HERALD_IDEMPOTENCY_TTL", "1w")]).contains("HERALD_IDEMPOTENCY_TTL"));
        assert!(error_of(&[("HERALD_METRICS_ADDR", "nine")]).contains("HERALD_METRICS_ADDR"));
    }

    #[test]
    fn the_alert_thresholds_default_to_the_prometheus_rules_and_each_has_its_variable() {
        let alerts = load(&[]).unwrap().alerts;
        assert!(alerts.enabled);
        assert_eq!(alerts.interval, Duration::from_secs(30));
        assert_eq!(alerts.success_rate_min, 0.9);
        assert_eq!(alerts.success_rate_window, Duration::from_secs(300));
        assert_eq!(alerts.success_rate_for, Duration::from_secs(120));
        assert_eq!(alerts.pending_max, 5000);
        assert_eq!(alerts.send_p99_max, Duration::from_secs(5));
        assert_eq!(alerts.dead_letters_for, Duration::ZERO);

        let alerts = load(&[
            ("HERALD_ALERTS_ENABLED", "false"),
            ("HERALD_ALERTS_INTERVAL", "10s"),
            ("HERALD_ALERTS_SUCCESS_RATE_MIN", "0.95"),
            ("HERALD_ALERTS_PENDING_FOR", "0s"),
            ("HERALD_ALERTS_SEND_P99_WINDOW", "15m"),
        ])
        .unwrap()
        .alerts;
        assert!(!alerts.enabled);
        assert_eq!(alerts.interval, Duration::from_secs(10));
        assert_eq!(alerts.success_rate_min, 0.95);
        assert_eq!(alerts.pending_for, Duration::ZERO);
        assert_eq!(alerts.send_p99_window, Duration::from_secs(900));

        for (var, bad) in [
            ("HERALD_ALERTS_INTERVAL", "0s"),
            ("HERALD_ALERTS_SUCCESS_RATE_MIN", "90"),
            ("HERALD_ALERTS_SUCCESS_RATE_MIN_SENDS_PER_SECOND", "-1"),
            ("HERALD_ALERTS_PENDING_MAX", "lots"),
            ("HERALD_ALERTS_RESOLVE_AFTER", "5 minutes"),
        ] {
            let error = error_of(&[(var, bad)]);
            assert!(error.contains(var), "{var}={bad}: {error}");
        }
    }

    #[test]
    fn history_is_kept_90_days_unless_herald_retention_says_otherwise() {
        assert_eq!(
            load(&[]).unwrap().retention.history,
            Duration::from_secs(90 * 86_400)
        );
        let settings = load(&[("HERALD_RETENTION", "30d")]).unwrap();
        assert_eq!(settings.retention.history, Duration::from_secs(30 * 86_400));
        assert!(error_of(&[("HERALD_RETENTION", "0d")]).contains("HERALD_RETENTION"));
    }

    #[test]
    fn librdkafka_options_from_the_file_and_the_environment_reach_every_kafka_client() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let default = std::fs::read_to_string(manifest.join(DEFAULT_CONFIG_FILE)).unwrap();
        assert!(default.contains("[kafka.librdkafka_options]\n"));
        let text = default.replace(
            "[kafka.librdkafka_options]\n",
            "[kafka.librdkafka_options]\n\"socket.keepalive.enable\" = true\n\"client.id\" = \"from-file\"\n",
        );
        let dir = std::env::temp_dir().join(format!("herald-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kafka.toml");
        std::fs::write(&file, text).unwrap();
        let vars: HashMap<&str, &str> = [
            (
                "HERALD_KAFKA_LIBRDKAFKA_OPTIONS",
                "security.protocol=SASL_SSL, sasl.mechanism=SCRAM-SHA-512,sasl.username=u,client.id=from-env",
            ),
            ("HERALD_KAFKA_SASL_PASSWORD", "kafka-pass-value"),
        ]
        .into();

        let settings =
            Settings::load_from(&file, &|name| vars.get(name).map(|v| v.to_string())).unwrap();

        let options = &settings.kafka.librdkafka_options;
        assert_eq!(options["security.protocol"], "SASL_SSL");
        assert_eq!(options["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(options["socket.keepalive.enable"], "true");
        assert_eq!(options["client.id"], "from-env", "the environment wins");
        let client = crate::kafka::client_config(&settings.kafka);
        assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(client.get("sasl.username"), Some("u"));
        assert_eq!(client.get("sasl.password"), Some("kafka-pass-value"));
        assert_eq!(client.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        for shown in [format!("{settings:?}"), format!("{client:?}")] {
            assert!(!shown.contains("kafka-pass-value"), "{shown}");
        }
    }

    #[test]
    fn consumers_bound_their_prefetch_unless_the_operator_sets_it() {
        let settings = load(&[]).unwrap();
        let consumer = crate::kafka::consumer_config(&settings.kafka);
        assert_eq!(consumer.get("queued.max.messages.kbytes"), Some("4096"));
        let producer = crate::kafka::client_config(&settings.kafka);
        assert_eq!(producer.get("queued.max.messages.kbytes"), None);

        let settings = load(&[(
            "HERALD_KAFKA_LIBRDKAFKA_OPTIONS",
            "queued.max.messages.kbytes=65536",
        )])
        .unwrap();
        let consumer = crate::kafka::consumer_config(&settings.kafka);
        assert_eq!(
            consumer.get("queued.max.messages.kbytes"),
            Some("65536"),
            "the operator's option wins"
        );
    }

    #[test]
    fn a_bad_librdkafka_option_is_named_in_the_error() {
        for (options, key) in [
            ("no.such.option=1", "no.such.option"),
            ("security.protocol=carrier_pigeon", "security.protocol"),
            ("bootstrap.servers=k:9092", "bootstrap.servers"),
        ] {
            let message = error_of(&[("HERALD_KAFKA_LIBRDKAFKA_OPTIONS", options)]);
            assert!(
                message.starts_with("invalid HERALD_KAFKA_LIBRDKAFKA_OPTIONS"),
                "{message}"
            );
            assert!(message.contains(&format!("{key:?}")), "{message}");
        }
        let message = error_of(&[("HERALD_KAFKA_LIBRDKAFKA_OPTIONS", "no-equals-sign")]);
        assert!(
            message.starts_with("invalid HERALD_KAFKA_LIBRDKAFKA_OPTIONS"),
            "{message}"
        );
    }

    #[test]
    fn a_kafka_secret_is_never_repeated_in_an_error() {
        let message = error_of(&[(
            "HERALD_KAFKA_LIBRDKAFKA_OPTIONS",
            "sasl.mechanism=PLAIN,sasl.password=hunter2",
        )]);
        assert!(message.contains("\"sasl.password\""), "{message}");
        assert!(message.contains("HERALD_KAFKA_SASL_PASSWORD"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");

        let message = error_of(&[
            ("HERALD_KAFKA_SASL_PASSWORD", "hunter2"),
            ("HERALD_KAFKA_LIBRDKAFKA_OPTIONS", "security.protocol=NOPE"),
        ]);
        assert!(message.contains("security.protocol"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn smtp_credentials_over_plain_smtp_are_refused_unless_explicitly_allowed() {
        let plain = "smtp://herald:mail-pass@mail.example.com:587";
        let message = error_of(&[("HERALD_SMTP_URL", plain)]);
        assert!(message.starts_with("invalid HERALD_SMTP_URL"), "{message}");
        assert!(
            message.contains("HERALD_SMTP_ALLOW_INSECURE_AUTH"),
            "{message}"
        );
        assert!(!message.contains("mail-pass"), "{message}");

        let allowed = load(&[
            ("HERALD_SMTP_URL", plain),
            ("HERALD_SMTP_ALLOW_INSECURE_AUTH", "true"),
        ]);
        assert!(allowed.is_ok());
        for tls in [
            "smtps://herald:mail-pass@mail.example.com:465",
            "smtp://herald:mail-pass@mail.example.com:587?tls=required",
            "smtp://127.0.0.1:1025",
        ] {
            let settings = load(&[("HERALD_SMTP_URL", tls)]).unwrap();
            assert_eq!(
                settings.smtp.url.unwrap().expose_secret(),
                tls,
                "{tls} is taken as it is"
            );
        }
        for (var, bad) in [
            ("HERALD_SMTP_URL", "smtp://mail.example.com:587?tls=maybe"),
            ("HERALD_SMTP_ALLOW_INSECURE_AUTH", "perhaps"),
        ] {
            let message = error_of(&[(var, bad)]);
            assert!(message.starts_with(&format!("invalid {var}")), "{message}");
        }
    }

    #[test]
    fn stream_and_import_bounds_have_defaults_and_can_be_set() {
        let limits = load(&[]).unwrap().limits;
        assert_eq!(
            (
                limits.streams_per_user,
                limits.streams_per_instance,
                limits.concurrent_imports
            ),
            (5, 10_000, 2)
        );
        let limits = load(&[
            ("HERALD_STREAMS_PER_USER", "2"),
            ("HERALD_STREAMS_PER_INSTANCE", "7"),
            ("HERALD_CONCURRENT_IMPORTS", "1"),
        ])
        .unwrap()
        .limits;
        assert_eq!(
            (
                limits.streams_per_user,
                limits.streams_per_instance,
                limits.concurrent_imports
            ),
            (2, 7, 1)
        );
        let message = error_of(&[("HERALD_STREAMS_PER_USER", "0")]);
        assert!(
            message.starts_with("invalid HERALD_STREAMS_PER_USER"),
            "{message}"
        );
    }

    #[test]
    fn a_typo_in_the_file_is_an_error_not_a_silent_default() {
        let dir = std::env::temp_dir().join(format!("herald-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "[http]\nadress = \"127.0.0.1:1\"\n").unwrap();

        let error = Settings::load_from(&file, &|_| None)
            .unwrap_err()
            .to_string();

        assert!(error.contains("bad.toml"), "{error}");
        assert!(error.contains("adress"), "{error}");
    }

    #[test]
    fn a_missing_file_says_which_and_how_to_choose_another() {
        let error = Settings::load_from(Path::new("/nonexistent/herald.toml"), &|_| None)
            .unwrap_err()
            .to_string();

        assert!(error.contains("/nonexistent/herald.toml"), "{error}");
        assert!(error.contains("HERALD_CONFIG_FILE"), "{error}");
    }
}
