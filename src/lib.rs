//! Herald: an event-driven notification delivery platform.
//!
//! Upstream services publish payment, subscription and order events to Kafka; Herald
//! consumes them, routes each to its channels, delivers with retries and dead-letters what
//! cannot be delivered, and keeps a queryable history. `../shared/DESIGN.md` and README.md
//! describe the flow and the contracts.
//!
//! # Layout
//!
//! - [`cli`]: the `herald` subcommands (`serve`, `migrate`, `topics create`, `demo`).
//! - [`config`]: layered settings, file defaults then `HERALD_*` variables.
//! - [`startup`]: `Application::build` and `run_until_stopped`, graceful shutdown.
//! - [`roles`]: the shares of work one instance can take (`serve --roles`).
//! - [`telemetry`]: tracing subscriber and the Prometheus recorder.
//! - [`domain`]: the vocabulary as types (events, channels, statuses, addresses).
//! - [`ingest`]: the Kafka consumers, decoding, poison handling, batching.
//! - [`intake`]: the write side both intakes share (notification, deliveries, outbox).
//! - [`deliveries`]: every statement that changes a delivery, one function per transition.
//! - [`routing`]: routing rules and per-channel planning.
//! - [`timing`]: when deliveries may go out: quiet hours, frequency caps, digests.
//! - [`event_schemas`]: the JSON Schema of each event type's data, checked at the edge.
//! - [`preferences`]: user channel preferences with their Redis cache.
//! - [`directory`]: the user directory (contacts).
//! - [`templates`]: tera templates, Korean and English, reloaded on change.
//! - [`outbox`]: outbox records (delivery events, dead letters).
//! - [`receipts`]: provider receipts (delivered, undelivered, bounced) applied to deliveries.
//! - [`suppressions`]: addresses a channel must not send to again.
//! - [`webhooks`]: signed outbound webhooks: endpoints, the fan-out from the event topics, calls.
//! - [`status_events`]: a notification's overall status on notification.status.events.
//! - [`alerts`]: the delivery-health alerts evaluated in process and announced on the ops Slack.
//! - [`retention`]: history past `HERALD_RETENTION` deleted from every table together.
//! - [`statistics`]: the planner's statistics of young, fast-growing tables kept up to date.
//! - [`api`]: the HTTP surface, one module per resource.
//! - [`auth`]: credentials: the admin token, API keys with scopes, end-user tokens.
//! - [`db`]: the PostgreSQL pool and embedded migrations (`migrations/`).
//! - [`kafka`]: client configuration, the topic catalogue (`kafka/topics.toml`), the
//!   batch consumer and the records consumers park (`parked_records`).
//! - [`broadcast`]: broadcasts to an audience, fanned out in the background.
//! - [`demo`]: sample events of the seed scenarios.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod broadcast;
pub mod channels;
pub mod cli;
pub mod config;
pub mod db;
pub mod deliveries;
pub mod demo;
pub mod directory;
pub mod dispatch;
pub mod dlq;
pub mod domain;
pub mod event_schemas;
pub mod ingest;
pub mod intake;
pub mod kafka;
pub mod outbox;
pub mod preferences;
pub mod read_model;
pub mod receipts;
pub mod relay;
pub mod retention;
pub mod roles;
pub mod routing;
pub mod startup;
pub mod statistics;
pub mod status_events;
pub mod suppressions;
pub mod telemetry;
pub mod templates;
pub mod timing;
pub mod webhooks;
