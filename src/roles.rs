//! The roles one Herald process can take. Every role by default; `herald serve --roles`
//! picks some, so that instances can be split (say, API nodes apart from dispatchers).
//! Every instance serves `/health/*` and `/metrics` whatever its roles.

use clap::ValueEnum;
use serde::Serialize;

/// One share of Herald's work.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum, Serialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The HTTP API under /api/v1 (intake, history, settings, dashboard, admin).
    Api,
    /// The Kafka consumers of the upstream event topics.
    Ingest,
    /// The dispatch workers that send deliveries through their channels, and the fan-out
    /// of broadcasts into deliveries.
    Dispatch,
    /// The outbox relay that publishes delivery events and dead letters to Kafka, with the
    /// housekeeping: retention and the in-process delivery-health alerts (one instance at a
    /// time each).
    Relay,
    /// The read-model projector (notification_log, delivery_stats).
    Projector,
    /// The dead-letter consumer that feeds the admin API.
    Dlq,
}

impl Role {
    /// Every role, in the order the workers start.
    pub const ALL: [Role; 6] = [
        Role::Api,
        Role::Ingest,
        Role::Dispatch,
        Role::Relay,
        Role::Projector,
        Role::Dlq,
    ];
}
