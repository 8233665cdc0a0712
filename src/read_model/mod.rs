//! The query side (CQRS): a projector turns notification.delivery.events into
//! `notification_log` (one row per delivery) and `delivery_stats` (terminal outcomes per
//! reporting day and channel); the history, inbox and dashboard APIs read only these.
//!
//! Both tables can be rebuilt from the topic (`herald read-model rebuild`): every event
//! carries a per-delivery version, so replaying is harmless, and each delivery's terminal
//! outcome is counted once, moved rather than counted again when an operator's retry
//! changes it.

pub mod projector;
pub mod queries;

pub use projector::Projector;
