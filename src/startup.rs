//! Building and running one Herald instance: `Application::build` connects, migrates and
//! binds; `run_until_stopped` serves until the shutdown token is cancelled, then drains
//! in-flight work within the grace period.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{self, AppState, Shared},
    auth::Authenticator,
    broadcast::fanout::{self, Fanout},
    channels::{
        Senders, email::EmailSender, gateway::GatewaySender, in_app::InAppSender,
        in_app_hub::StreamHub, slack::SlackSender,
    },
    config::Settings,
    db,
    dispatch::{self, Dispatcher, rate_limit::RateLimiter},
    dlq,
    domain::{Channel, Domain},
    event_schemas::EventSchemas,
    ingest::{self, Ingestor},
    intake::{self, writer::IntakeWriter},
    kafka::{
        KafkaAdmin,
        consumer::{self, BatchLimits, ConsumerSpec, Settled},
        watchdog::Watchdogs,
    },
    outbox::DELIVERY_EVENTS_TOPIC,
    read_model::Projector,
    relay::Relay,
    roles::Role,
    routing::RoutingTable,
    telemetry,
    templates::{self, Templates},
    webhooks,
};

/// How long `build` keeps retrying when PostgreSQL is not reachable yet.
const DATABASE_WAIT: Duration = Duration::from_secs(30);

/// A built, bound, not yet running Herald instance.
pub struct Application {
    listener: TcpListener,
    /// `/metrics` on a listener of its own (HERALD_METRICS_ADDR).
    metrics_listener: Option<TcpListener>,
    state: AppState,
    tasks: TaskTracker,
    grace_period: Duration,
}

impl Application {
    /// Connects to the dependencies, applies migrations and binds the HTTP listener.
    /// Redis and Kafka are connected lazily: the instance starts while they are down and
    /// reports so on `/health/ready`. PostgreSQL must be reachable within [`DATABASE_WAIT`],
    /// because nothing works without the schema.
    pub async fn build(settings: Settings, roles: &[Role]) -> anyhow::Result<Self> {
        let work_db = db::pool(&settings.database)?;
        migrate_when_reachable(&work_db).await?;
        let db = db::api_pool(&settings.database)?;

        let redis_client = redis::Client::open(settings.redis.url.expose_secret())
            .context("HERALD_REDIS_URL is not a usable Redis URL")?;
        let redis = ConnectionManager::new_lazy_with_config(
            redis_client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_number_of_retries(1),
        )
        .context("Failed to set up the Redis connection")?;
        let kafka = KafkaAdmin::new(&settings.kafka)?;
        let routing = Arc::new(RoutingTable::load(&settings.ingest.routing_file)?);
        let schemas = Arc::new(EventSchemas::load(
            &settings.templates.schemas_dir,
            routing.event_types(),
        )?);
        let templates = Arc::new(
            Templates::load(&settings.templates.dir)?.with_default_locale(routing.default_locale()),
        );
        // A digested event type needs digest templates for each of its channels, in both
        // languages: found missing at the first digest's send, it would dead-letter them.
        for (_, event_type, channels) in routing.routes() {
            if routing.policy(event_type).digest.is_none() {
                continue;
            }
            let folder = format!("{event_type}{}", templates::DIGEST_SUFFIX);
            for channel in channels {
                anyhow::ensure!(
                    templates.covers(&folder, *channel),
                    "{event_type} is digested (routing file) but templates/{{ko,en}}/{folder}/ \
                     lacks the {channel} templates"
                );
            }
        }
        // The versions activated through the API apply from the first render.
        templates::store::refresh(&work_db, &templates)
            .await
            .context("Failed to load the template versions in effect")?;

        let listener = TcpListener::bind(settings.http.addr)
            .await
            .with_context(|| {
                format!(
                    "Failed to listen on {} (HERALD_HTTP_ADDR)",
                    settings.http.addr
                )
            })?;
        let metrics_listener =
            match settings.http.metrics_addr {
                Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                    format!("Failed to listen on {addr} (HERALD_METRICS_ADDR)")
                })?),
                None => None,
            };

        let mut roles = roles.to_vec();
        roles.sort();
        roles.dedup();
        let grace_period = settings.shutdown.grace_period;
        let channel_enabled: Arc<dyn Fn(Channel) -> bool + Send + Sync> =
            Arc::new(intake::channel_enabled(&settings));
        log_disabled_channels(&settings, &*channel_enabled);
        let ingestor = Ingestor {
            db: work_db.clone(),
            redis: redis.clone(),
            routing: routing.clone(),
            schemas: schemas.clone(),
            channel_enabled: channel_enabled.clone(),
            topic_prefix: settings.kafka.topic_prefix.clone(),
            redis_prefix: settings.redis.key_prefix.clone(),
            max_event_bytes: settings.ingest.max_event_bytes,
            wakeup: dispatch::wakeup::Wakeup::new(work_db.clone()),
        };
        let auth = Authenticator::new(
            db.clone(),
            settings.admin.token.as_ref(),
            settings.access.user_token_secret.as_ref(),
        );
        let shutdown = CancellationToken::new();
        let streams = StreamHub::new(
            redis_client,
            settings.redis.key_prefix.clone(),
            settings.limits.streams_per_user,
            settings.limits.streams_per_instance,
            shutdown.clone(),
        );
        let imports = Arc::new(Semaphore::new(settings.limits.concurrent_imports));
        let intake = IntakeWriter::start(
            db.clone(),
            settings.kafka.topic_prefix.clone(),
            ingestor.wakeup.clone(),
            settings.access.idempotency_ttl,
        );
        let state = AppState::new(Shared {
            settings: Arc::new(settings),
            db,
            work_db,
            auth,
            redis,
            kafka,
            metrics: telemetry::metrics_handle(),
            roles: roles.into(),
            shutdown,
            routing,
            schemas,
            templates,
            channel_enabled,
            streams,
            imports,
            ingestor,
            intake,
            consumers: Watchdogs::default(),
        });
        Ok(Application {
            listener,
            metrics_listener,
            state,
            tasks: TaskTracker::new(),
            grace_period,
        })
    }

    /// The bound address (the real port when HERALD_HTTP_ADDR asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The token that stops this instance when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// The shared handles, for tests and the workers.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token is cancelled, then stops taking work and waits up to
    /// the grace period for in-flight requests and tasks.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Application {
            listener,
            metrics_listener,
            state,
            tasks,
            grace_period,
        } = self;
        let shutdown = state.shutdown.clone();
        tracing::info!(
            addr = %listener.local_addr()?,
            roles = ?state.roles,
            "Herald is serving"
        );
        let failure = Arc::new(std::sync::Mutex::new(None::<String>));
        spawn_workers(&state, &tasks, &failure)?;
        if let Some(metrics_listener) = metrics_listener {
            tracing::info!(addr = %metrics_listener.local_addr()?, "metrics are served here");
            let metrics = axum::Router::from(api::metrics::router()).with_state(state.clone());
            tasks.spawn(
                axum::serve(metrics_listener, metrics)
                    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                    .into_future(),
            );
        }
        let app = api::router(state);
        let mut server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .into_future(),
        );

        tokio::select! {
            result = &mut server => {
                shutdown.cancel();
                result.context("The HTTP server task failed")?.context("The HTTP server failed")?;
                anyhow::bail!("The HTTP server stopped on its own");
            }
            () = shutdown.cancelled() => {}
        }

        tracing::info!(?grace_period, "shutting down: finishing in-flight work");
        tasks.close();
        let drained = tokio::time::timeout(grace_period, async {
            let server_result = (&mut server).await;
            tasks.wait().await;
            server_result
        })
        .await;
        match drained {
            Ok(server_result) => {
                server_result
                    .context("The HTTP server task failed")?
                    .context("The HTTP server failed")?;
                if let Some(reason) = failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    anyhow::bail!(reason);
                }
                tracing::info!("shutdown complete");
            }
            Err(_) => {
                server.abort();
                tracing::warn!(
                    ?grace_period,
                    "in-flight work did not finish within the grace period; stopping anyway"
                );
            }
        }
        Ok(())
    }
}

/// The senders of every channel that has an endpoint configured.
fn senders(state: &AppState) -> anyhow::Result<Senders> {
    let settings = &state.settings;
    let timeout = settings.dispatch.send_timeout;
    let mut senders: Senders = HashMap::new();
    if let Some(url) = &settings.smtp.url {
        let pool = settings.dispatch.concurrency_of(Channel::Email) as u32;
        let email = EmailSender::new(url, &settings.smtp.from, timeout, pool)
            .context("Invalid SMTP settings (HERALD_SMTP_URL, HERALD_SMTP_FROM)")?;
        senders.insert(Channel::Email, Arc::new(email));
    }
    if let Some(webhook) = &settings.channels.slack_webhook_url {
        senders.insert(
            Channel::Slack,
            Arc::new(SlackSender::new(webhook.clone(), timeout)?),
        );
    }
    senders.insert(
        Channel::InApp,
        Arc::new(InAppSender::new(
            state.redis.clone(),
            settings.redis.key_prefix.clone(),
        )),
    );
    for (channel, url) in [
        (Channel::Sms, &settings.channels.sms_gateway_url),
        (Channel::Kakaotalk, &settings.channels.kakaotalk_gateway_url),
        (Channel::Push, &settings.channels.push_gateway_url),
    ] {
        if let Some(url) = url {
            let key = settings.dispatch.gateway_keys.get(&channel).cloned();
            senders.insert(
                channel,
                Arc::new(GatewaySender::new(channel, url.clone(), key, timeout)?),
            );
        }
    }
    Ok(senders)
}

/// Posts breaker announcements to the ops Slack webhook, when there is one.
fn announcer(state: &AppState) -> Option<Arc<dyn Fn(String) + Send + Sync>> {
    let webhook = state.settings.channels.slack_webhook_url.clone()?;
    let client = crate::channels::http_client(Duration::from_secs(5)).ok()?;
    Some(Arc::new(move |text: String| {
        let (client, webhook) = (client.clone(), webhook.clone());
        tokio::spawn(async move {
            let sent = client
                .post(webhook.expose_secret())
                .json(&serde_json::json!({ "text": text }))
                .send()
                .await;
            if let Err(error) = sent {
                tracing::warn!(error = %error.without_url(), "cannot announce on Slack");
            }
        });
    }))
}

/// Starts the workers of this instance's roles. A worker that fails stops the instance
/// (with the reason as its exit error) rather than leaving it half-working.
/// The webhook fan-out (a consumer of the event topics, group `notif-webhooks`) and the
/// sender of the calls it makes ([`crate::webhooks`]).
fn spawn_webhooks(
    state: &AppState,
    tasks: &TaskTracker,
    failure: &Arc<std::sync::Mutex<Option<String>>>,
) -> anyhow::Result<()> {
    let settings = state.settings.clone();
    let prefix = settings.kafka.topic_prefix.clone();
    let wake = Arc::new(tokio::sync::Notify::new());
    let sender = webhooks::sender::Sender::new(
        state.work_db.clone(),
        settings.webhooks.clone(),
        prefix.clone(),
        announcer(state),
        wake.clone(),
    )?;
    tasks.spawn(sender.run(state.shutdown.clone()));
    let spec = ConsumerSpec {
        group: format!("{prefix}{}", webhooks::fanout::GROUP),
        topics: webhooks::Kind::ALL
            .into_iter()
            .map(|k| format!("{prefix}{}", k.topic()))
            .collect(),
        limits: BatchLimits {
            max_messages: 2000,
            max_wait: Duration::from_millis(20),
            settled: None,
        },
        fetch_wait_ms: state.settings.kafka.internal_fetch_wait_ms,
        in_flight: 1,
    };
    let db = state.work_db.clone();
    let give_up = settings.webhooks.give_up_after;
    let (state, spawner, failure) = (state.clone(), tasks.clone(), failure.clone());
    // The fan-out joins its group only once an endpoint exists, from that endpoint's
    // creation on (`fanout::first_endpoint`); then it reads for as long as it runs.
    tasks.spawn(async move {
        let shutdown = state.shutdown.clone();
        let Some(since) = webhooks::fanout::first_endpoint(&db, &shutdown).await else {
            return;
        };
        let (kafka, group, topics) = (
            state.settings.kafka.clone(),
            spec.group.clone(),
            spec.topics.clone(),
        );
        let moved = tokio::task::spawn_blocking(move || {
            consumer::fast_forward(&kafka, &group, &topics, since)
        })
        .await;
        match moved {
            Ok(Ok(moved)) => tracing::info!(moved, %since, "webhook fan-out starts"),
            // It then reads from the group's offsets: calls for records published before
            // the endpoint existed, rather than none for those after.
            Ok(Err(error)) => tracing::warn!(
                error = format!("{error:#}"),
                "cannot move the webhook fan-out's offsets to its first endpoint's creation"
            ),
            Err(error) => tracing::warn!(%error, "moving the webhook fan-out's offsets failed"),
        }
        spawn_consumer(
            &state,
            &spawner,
            &failure,
            spec,
            "the webhook fan-out",
            move |batch| {
                let (db, prefix, wake) = (db.clone(), prefix.clone(), wake.clone());
                async move {
                    if webhooks::fanout::apply(&db, &prefix, give_up, &batch).await? > 0 {
                        wake.notify_one();
                    }
                    Ok(())
                }
            },
        );
    });
    Ok(())
}

fn spawn_workers(
    state: &AppState,
    tasks: &TaskTracker,
    failure: &Arc<std::sync::Mutex<Option<String>>>,
) -> anyhow::Result<()> {
    // Every instance renders (dispatch sends, the API previews and checks edits), so every
    // one follows the template versions activated through the API on any instance.
    // On the API's pool: the workers' pool can be saturated by dispatch, and this is one
    // primary-key read a second.
    // Every instance's workers prepare statements whose cached plans a table that outgrew
    // its statistics would spoil (crate::statistics).
    tasks.spawn(crate::statistics::run(
        state.work_db.clone(),
        state.shutdown.clone(),
    ));
    tasks.spawn(templates::store::watch(
        state.db.clone(),
        state.templates.clone(),
        state.settings.templates.refresh,
        state.shutdown.clone(),
    ));
    if state.roles.contains(&Role::Dispatch) {
        spawn_dispatch(state, tasks)?;
    }
    if state.roles.contains(&Role::Projector) {
        spawn_projector(state, tasks, failure);
    }
    if state.roles.contains(&Role::Dispatch) {
        spawn_webhooks(state, tasks, failure)?;
    }
    if state.roles.contains(&Role::Dlq) {
        spawn_dlq(state, tasks, failure);
    }
    if state.roles.contains(&Role::Api) {
        spawn_api_upkeep(state, tasks);
    }
    if state.roles.contains(&Role::Relay) {
        spawn_relay(state, tasks)?;
    }
    if state.roles.contains(&Role::Ingest) {
        spawn_ingest(state, tasks, failure);
    }
    Ok(())
}

/// The dispatcher's channel loops, the receipt poller (when a gateway has a status URL) and
/// the broadcast fan-out.
fn spawn_dispatch(state: &AppState, tasks: &TaskTracker) -> anyhow::Result<()> {
    let settings = &state.settings;
    let dispatcher = Arc::new(Dispatcher {
        db: state.work_db.clone(),
        senders: senders(state)?,
        templates: state.templates.clone(),
        limiter: RateLimiter::new(state.redis.clone(), settings.redis.key_prefix.clone()),
        breakers: Dispatcher::breakers(&settings.dispatch),
        speeds: Dispatcher::speeds(&settings.dispatch),
        settings: settings.dispatch.clone(),
        broadcast_share: settings.broadcast.dispatch_share,
        topic_prefix: settings.kafka.topic_prefix.clone(),
        announcer: announcer(state),
        recorder: Default::default(),
        redis: state.redis.clone(),
        redis_prefix: settings.redis.key_prefix.clone(),
        routing: state.routing.clone(),
        wakeup: state.ingestor.wakeup.clone(),
        caps: crate::timing::frequency_cap::FrequencyCaps::new(
            state.routing.frequency_caps().to_vec(),
            state.redis.clone(),
            settings.redis.key_prefix.clone(),
        ),
        receipt_polls: dispatch::worker::ReceiptPolls {
            channels: settings.channels.status_urls.keys().copied().collect(),
            first_wait: settings.channels.receipt_poll_backoff[0],
            deadline: settings.channels.receipt_poll_deadline,
        },
    });
    tasks.spawn(dispatch::run(dispatcher, state.shutdown.clone()));
    if !settings.channels.status_urls.is_empty() {
        let poller = crate::receipts::poll::Poller::new(
            state.work_db.clone(),
            settings.kafka.topic_prefix.clone(),
            settings.channels.status_urls.clone(),
            settings.dispatch.gateway_keys.clone(),
            settings.channels.receipt_poll_backoff.clone(),
            settings.dispatch.send_timeout,
        )?;
        tasks.spawn(poller.run(state.shutdown.clone()));
    }
    let fanout = Arc::new(Fanout {
        db: state.work_db.clone(),
        redis: state.redis.clone(),
        settings: settings.broadcast.clone(),
        redis_prefix: settings.redis.key_prefix.clone(),
        topic_prefix: settings.kafka.topic_prefix.clone(),
        routing: state.routing.clone(),
        channel_enabled: state.channel_enabled.clone(),
        wakeup: state.ingestor.wakeup.clone(),
    });
    tasks.spawn(fanout::run(fanout, state.shutdown.clone()));
    Ok(())
}

/// How long the delivery events topic must stay quiet before the projector applies a batch
/// whose deliveries have all reached their outcome, ahead of its linger. Under load the
/// relay publishes every few milliseconds (its producer lingers 5 ms), so such a gap marks
/// the end of a burst, and batches are not cut into small ones meanwhile; at the end of a
/// burst (a quiet topic, a backlog worked off) the read model then trails the last outcome
/// by this and the apply, not by up to the whole linger.
const PROJECTOR_QUIET: Duration = Duration::from_millis(50);

/// The read-model projector: a consumer of the delivery events.
fn spawn_projector(
    state: &AppState,
    tasks: &TaskTracker,
    failure: &Arc<std::sync::Mutex<Option<String>>>,
) {
    let projector = Projector {
        db: state.work_db.clone(),
        reporting_tz: state.settings.read_model.reporting_timezone,
    };
    let settings = &state.settings;
    let spec = ConsumerSpec {
        group: format!("{}notif-readmodel", settings.kafka.topic_prefix),
        topics: vec![format!(
            "{}{DELIVERY_EVENTS_TOPIC}",
            settings.kafka.topic_prefix
        )],
        // A batch costs the projector a fixed number of statements, so a backlog is
        // worked off in large ones; lingering lets a delivery's creation and outcome
        // meet in one batch and its log row be written once (config/default.toml). A
        // batch whose every delivery has reached its outcome has nothing left to wait
        // for: it ends once the topic has been quiet for PROJECTOR_QUIET.
        limits: BatchLimits {
            max_messages: settings.read_model.projector_batch_max_messages,
            max_wait: settings.read_model.projector_linger,
            settled: Some(Settled {
                quiet: PROJECTOR_QUIET,
                classify: crate::read_model::projector::delivery_left_open,
            }),
        },
        fetch_wait_ms: settings.kafka.internal_fetch_wait_ms,
        in_flight: 1,
    };
    let group = spec.group.clone();
    spawn_consumer(
        state,
        tasks,
        failure,
        spec,
        "the read-model projector",
        move |batch| {
            let (projector, group) = (projector.clone(), group.clone());
            async move { projector.apply_or_park(&group, &batch).await.map(drop) }
        },
    );
}

/// The DLQ consumer, its gauges and the replays by filter.
fn spawn_dlq(
    state: &AppState,
    tasks: &TaskTracker,
    failure: &Arc<std::sync::Mutex<Option<String>>>,
) {
    // The DLQ gauges (pending by class, age of the oldest) move with time too, not only
    // when letters arrive.
    let (db, shutdown) = (state.work_db.clone(), state.shutdown.clone());
    tasks.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = every.tick() => dlq::store::export_sizes(&db).await,
                () = shutdown.cancelled() => return,
            }
        }
    });
    // Replays by filter, one instance at a time; resumed after a crash.
    tasks.spawn(dlq::replay::run(
        state.ingestor.clone(),
        state.settings.dlq.replay_cap,
        state.shutdown.clone(),
    ));
    let db = state.work_db.clone();
    let prefix = state.settings.kafka.topic_prefix.clone();
    let spec = ConsumerSpec {
        group: format!("{prefix}notif-dlq"),
        topics: dlq::store::topics()
            .into_iter()
            .map(|t| format!("{prefix}{t}"))
            .collect(),
        limits: BatchLimits {
            max_messages: 200,
            max_wait: Duration::from_millis(20),
            settled: None,
        },
        fetch_wait_ms: state.settings.kafka.internal_fetch_wait_ms,
        in_flight: 1,
    };
    let group = spec.group.clone();
    spawn_consumer(
        state,
        tasks,
        failure,
        spec,
        "the DLQ consumer",
        move |batch| {
            let (db, prefix, group) = (db.clone(), prefix.clone(), group.clone());
            async move {
                dlq::store::store(&db, &group, &prefix, &batch).await?;
                dlq::store::export_sizes(&db).await;
                Ok(())
            }
        },
    );
}

/// What an API instance keeps up besides its requests: expired Idempotency-Keys pruned, and
/// receipts matched to their deliveries.
fn spawn_api_upkeep(state: &AppState, tasks: &TaskTracker) {
    let (db, ttl, shutdown) = (
        state.db.clone(),
        state.settings.access.idempotency_ttl,
        state.shutdown.clone(),
    );
    tasks.spawn(async move {
        let mut every = tokio::time::interval(intake::IDEMPOTENCY_PRUNE_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = shutdown.cancelled() => return,
            }
            match intake::prune_idempotency_keys(&db, ttl).await {
                Ok(pruned) => tracing::debug!(pruned, "expired idempotency keys pruned"),
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot prune idempotency keys"
                ),
            }
        }
    });
    tasks.spawn(crate::receipts::run(
        state.db.clone(),
        state.settings.kafka.topic_prefix.clone(),
        state.shutdown.clone(),
    ));
}

/// The outbox relay, with the retention purge and the alerts that its instances run.
fn spawn_relay(state: &AppState, tasks: &TaskTracker) -> anyhow::Result<()> {
    let relay = Relay::new(state.work_db.clone(), &state.settings.kafka)?;
    tasks.spawn(relay.run(state.shutdown.clone()));
    // The relay's instances keep the tables trimmed: the outbox (in the relay) and the
    // history past its retention.
    tasks.spawn(crate::retention::run(
        state.work_db.clone(),
        state.settings.retention.clone(),
        state.settings.read_model.reporting_timezone,
        state.shutdown.clone(),
    ));
    // And evaluate the delivery-health alerts (one instance at a time, crate::alerts).
    let slack = match &state.settings.channels.slack_webhook_url {
        Some(webhook) => Some(SlackSender::new(webhook.clone(), Duration::from_secs(5))?),
        None => None,
    };
    tasks.spawn(crate::alerts::run(
        state.work_db.clone(),
        state.settings.alerts.clone(),
        slack,
        state.shutdown.clone(),
    ));
    Ok(())
}

/// One consumer per upstream domain.
fn spawn_ingest(
    state: &AppState,
    tasks: &TaskTracker,
    failure: &Arc<std::sync::Mutex<Option<String>>>,
) {
    let settings = &state.settings;
    let ingestor = state.ingestor.clone();
    let per_lane = BatchLimits {
        max_messages: settings.ingest.batch_max_messages,
        max_wait: settings.ingest.batch_max_wait,
        settled: None,
    };
    let parallelism =
        ingest::consumer::Parallelism::for_roles(state.roles.contains(&Role::Dispatch));
    tracing::info!(?parallelism, "ingest parallelism");
    for domain in Domain::CONSUMED {
        let (ingestor, settings, shutdown, failure, watchdogs) = (
            ingestor.clone(),
            settings.clone(),
            state.shutdown.clone(),
            failure.clone(),
            state.consumers.clone(),
        );
        tasks.spawn(async move {
            let result = ingest::consumer::run(
                ingestor,
                &settings,
                domain,
                per_lane,
                parallelism,
                &watchdogs,
                shutdown.clone(),
            )
            .await;
            fail_on_error(
                result,
                &format!("the {domain} consumer"),
                &failure,
                &shutdown,
            );
        });
    }
}

/// Runs a consumer of `spec` with `handle` in a task of its own; one that ends in error
/// stops the instance, named `what` in the reason.
fn spawn_consumer<F, Fut>(
    state: &AppState,
    tasks: &TaskTracker,
    failure: &Arc<std::sync::Mutex<Option<String>>>,
    spec: ConsumerSpec,
    what: &'static str,
    handle: F,
) where
    F: Fn(Arc<Vec<consumer::IncomingMessage>>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let (settings, shutdown, watchdogs, failure) = (
        state.settings.clone(),
        state.shutdown.clone(),
        state.consumers.clone(),
        failure.clone(),
    );
    tasks.spawn(async move {
        let result =
            consumer::run(&settings.kafka, spec, &watchdogs, shutdown.clone(), handle).await;
        fail_on_error(result, what, &failure, &shutdown);
    });
}

/// A worker that ends in error stops the instance, with the reason as its exit error.
fn fail_on_error(
    result: anyhow::Result<()>,
    worker: &str,
    failure: &std::sync::Mutex<Option<String>>,
    shutdown: &CancellationToken,
) {
    if let Err(error) = result {
        let reason = format!("{worker} failed: {error:#}");
        tracing::error!(%reason);
        failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason);
        shutdown.cancel();
    }
}

/// Runs migrations, retrying while PostgreSQL is unreachable for up to [`DATABASE_WAIT`].
async fn migrate_when_reachable(db: &sqlx::PgPool) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match db::migrate(db).await {
            Ok(()) => return Ok(()),
            Err(error) if started.elapsed() < DATABASE_WAIT && is_connection_error(&error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "PostgreSQL not reachable yet; retrying"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

fn is_connection_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::migrate::MigrateError>(),
            Some(sqlx::migrate::MigrateError::Execute(
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut
            ))
        ) || matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
        )
    })
}

/// DESIGN §6: an unset channel endpoint disables that channel, and startup says so.
fn log_disabled_channels(settings: &Settings, enabled: &dyn Fn(Channel) -> bool) {
    let disabled: Vec<Channel> = Channel::ALL.into_iter().filter(|c| !enabled(*c)).collect();
    if !disabled.is_empty() {
        tracing::info!(
            channels = ?disabled,
            "channels without an endpoint are disabled; their deliveries will be SKIPPED"
        );
    }
    if settings.admin.token.is_none() {
        tracing::warn!(
            "HERALD_ADMIN_TOKEN is not set: only API keys (herald keys create) and user tokens are accepted"
        );
    }
    if settings.access.user_token_secret.is_none() {
        tracing::info!("HERALD_USER_TOKEN_SECRET is not set: user tokens are refused");
    }
}
