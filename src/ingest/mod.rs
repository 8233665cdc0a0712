//! Ingestion: one consumer per upstream domain (payment, subscription, order), each in its
//! own consumer group, turning events into notifications.
//!
//! A batch of messages becomes one PostgreSQL transaction (notifications, deliveries,
//! outbox; a notification's unique topic and eventId make a redelivered event a
//! duplicate); only after it commits are the offsets stored for the periodic commit.
//! Poison messages become dead letters in the same transaction. An infrastructure failure
//! stores nothing and retries the same batch with backoff, so a message is never lost and
//! never blamed for an outage.

pub mod batch;
pub mod consumer;
pub mod decode;

pub use batch::{BatchOutcome, IncomingMessage, Ingestor};
