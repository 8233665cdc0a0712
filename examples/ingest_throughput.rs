//! Measures ingest throughput on the local stack: publishes N events to a fresh topic set,
//! starts Herald with only the `ingest` role against a fresh database, and times how long it
//! takes until every event is a stored notification.
//!
//! ```sh
//! eval "$(scripts/stack.sh env test | sed 's/^/export /')"
//! cargo run --release --example ingest_throughput -- 20000
//! ```
//!
//! Issue 6 grows this into `make bench`; this is the figure the ingestion issue reports.

use std::time::{Duration, Instant};

use herald::{roles::Role, startup::Application};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

#[path = "support/mod.rs"]
mod support;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events = support::arg(1, 20_000)?;
    let settings = support::isolated_settings().await?;
    let run = settings.kafka.topic_prefix.clone();

    let producer: FutureProducer = herald::kafka::client_config(&settings.kafka)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let topic = format!("{}fluxpay.payment.events", settings.kafka.topic_prefix);
    let publish_started = Instant::now();
    let mut pending = Vec::with_capacity(events);
    for i in 0..events {
        let user = (i % 5000) as i64 + 1;
        let payload = serde_json::json!({
            "eventId": format!("{run}-{i}"),
            "eventType": "PAYMENT_COMPLETED",
            "occurredAt": chrono::Utc::now().to_rfc3339(),
            "userId": user,
            "recipient": { "email": format!("u{user}@example.com"), "locale": "en" },
            "data": { "orderId": format!("o-{i}"), "amount": 12000, "currency": "KRW" }
        })
        .to_string();
        let key = user.to_string();
        pending.push(
            producer
                .send_result(FutureRecord::to(&topic).key(&key).payload(&payload))
                .map_err(|(e, _)| e)?,
        );
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    println!(
        "published {events} events in {:.2} s",
        publish_started.elapsed().as_secs_f64()
    );

    let app = Application::build(settings.clone(), &[Role::Ingest]).await?;
    let pool = app.state().db.clone();
    let shutdown = app.shutdown_token();
    let started = Instant::now();
    let server = tokio::spawn(app.run_until_stopped());
    let mut first_seen = None;
    loop {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
            .fetch_one(&pool)
            .await?;
        if stored > 0 && first_seen.is_none() {
            first_seen = Some(started.elapsed());
        }
        if stored as usize >= events {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "timed out at {stored}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = started.elapsed();
    let from_first = total - first_seen.unwrap_or_default();
    println!(
        "ingest: {events} events in {:.2} s from start ({:.0} events/s); {:.2} s from the first stored ({:.0} events/s); batch limit {} messages / {} ms",
        total.as_secs_f64(),
        events as f64 / total.as_secs_f64(),
        from_first.as_secs_f64(),
        events as f64 / from_first.as_secs_f64(),
        settings.ingest.batch_max_messages,
        settings.ingest.batch_max_wait.as_millis(),
    );
    shutdown.cancel();
    server.await??;
    Ok(())
}
