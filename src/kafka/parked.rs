//! Records a consumer could not store, set aside so that the consumer moves on.
//!
//! A record PostgreSQL refuses (a constraint, a NUL in a text, a value out of range) would
//! be refused again on every retry: taking it for an outage stops its consumer for good and
//! every later record waits behind it. Consumers whose handlers write one batch in one
//! transaction replay a refused batch record by record ([`replay_alone`]), and a record
//! refused on its own is parked in `parked_records` with the reason, counted in
//! `herald_consumer_parked_total{group}` and logged. Operators read the table (README,
//! "Parked messages").

use std::future::Future;

use anyhow::Context;
use sqlx::PgPool;

use crate::{db::is_data_error, kafka::consumer::IncomingMessage};

/// Stores `message` in `parked_records` with `reason`.
pub async fn park(
    db: &PgPool,
    group: &str,
    message: &IncomingMessage,
    reason: &str,
) -> anyhow::Result<()> {
    // BYTEA for the headers and no NUL in the reason: the parking must not be refused for
    // the very value that got the record parked.
    let headers = serde_json::to_vec(&message.headers).context("Failed to encode headers")?;
    sqlx::query(
        "INSERT INTO parked_records (consumer_group, topic, kafka_partition, kafka_offset, \
             message_key, payload, headers, reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(group)
    .bind(&message.topic)
    .bind(message.partition)
    .bind(message.offset)
    .bind(&message.key)
    .bind(&message.payload)
    .bind(headers)
    .bind(reason.replace('\0', ""))
    .execute(db)
    .await
    .context("Failed to park a record")?;
    metrics::counter!("herald_consumer_parked_total", "group" => group.to_owned()).increment(1);
    tracing::error!(
        group,
        topic = %message.topic,
        partition = message.partition,
        offset = message.offset,
        reason,
        "record parked: the database refused it"
    );
    Ok(())
}

/// After a batch was refused with a data error: handles each message alone with `handle`,
/// and parks the ones refused on their own. Any other error (an outage) is returned, and the
/// consumer retries the whole batch later; the handlers are idempotent, so the messages
/// already handled absorb the repeat. Returns each message's result, `None` where parked.
pub async fn replay_alone<'a, T, F, Fut>(
    db: &PgPool,
    group: &str,
    messages: &'a [IncomingMessage],
    handle: F,
) -> anyhow::Result<Vec<Option<T>>>
where
    F: Fn(&'a IncomingMessage) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut results = Vec::with_capacity(messages.len());
    for message in messages {
        match handle(message).await {
            Ok(result) => results.push(Some(result)),
            Err(error) if is_data_error(&error) => {
                park(db, group, message, &format!("{error:#}")).await?;
                results.push(None);
            }
            Err(error) => return Err(error),
        }
    }
    Ok(results)
}
