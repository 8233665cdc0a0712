//! The query side (CQRS): a projector turns notification.delivery.events into
//! `notification_log` (one row per delivery) and `delivery_stats` (terminal outcomes per
//! reporting day and channel); the history, inbox and dashboard APIs read only these.
//!
//! Both tables can be rebuilt from the topic (`herald read-model rebuild`): every event
//! carries a per-delivery version, so replaying is harmless, and each delivery's terminal
//! outcome is counted once, moved rather than counted again when an operator's retry
//! changes it.
//!
//! The projector lingers (`HERALD_PROJECTOR_LINGER_MS`) so that a delivery's creation and
//! outcome usually reach it in one batch: its log row is then inserted once, in its final
//! state, instead of inserted and updated. A batch in which every delivery has reached its
//! outcome has nothing left to wait for, and is applied as soon as the topic falls quiet
//! (`crate::kafka::consumer::Settled`). An update that remains can be HOT (no index
//! entry written): the recent-failures index keys on `failed_at`, generated from the status
//! and NULL unless the delivery FAILED, so no other outcome changes an indexed column
//! (migration 0010).

pub mod projector;
pub mod queries;

pub use projector::Projector;
