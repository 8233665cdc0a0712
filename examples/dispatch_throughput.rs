//! Measures the delivery engine on the local stack: deliveries/s per channel from a queued
//! backlog, and PENDING-to-SUCCESS latency (p50/p99) at a steady offered rate.
//!
//! ```sh
//! eval "$(scripts/stack.sh env test | sed 's/^/export /')"
//! cargo run --release --example dispatch_throughput -- 5000 200   # backlog, offered rate/s
//! ```
//!
//! IN_APP publishes to Redis, SLACK posts to a local HTTP sink (wiremock, answering 200 at
//! once), EMAIL goes to MailDev over pooled SMTP.

use std::time::{Duration, Instant};

use herald::{
    config::Settings,
    domain::{Channel, Domain, EventType, Recipient, UserId},
    intake::{self, Draft, Source},
    roles::Role,
    routing::RoutingTable,
    startup::Application,
};
use sqlx::PgPool;
use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

#[path = "support/mod.rs"]
mod support;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let backlog = support::arg(1, 5_000)?;
    let sink = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&sink)
        .await;
    let mut settings = support::isolated_settings().await?;
    settings.channels.slack_webhook_url = Some(format!("{}/slack", sink.uri()).into());

    // Phase 1: a backlog per channel, then the dispatcher drains it.
    let pool = herald::db::pool(&settings.database)?;
    herald::db::migrate(&pool).await?;
    let routing = RoutingTable::load(&settings.ingest.routing_file)?;
    let enabled = intake::channel_enabled(&settings);
    for (channel, count) in [
        (Channel::InApp, backlog),
        (Channel::Slack, backlog),
        (Channel::Email, backlog / 5),
    ] {
        queue(&pool, &routing, &enabled, &settings, channel, count).await?;
    }
    let app = Application::build(settings.clone(), &[Role::Dispatch, Role::Relay]).await?;
    let shutdown = app.shutdown_token();
    let started = Instant::now();
    let server = tokio::spawn(app.run_until_stopped());
    let mut done = std::collections::BTreeMap::new();
    while done.len() < 3 {
        let counts: Vec<(String, i64)> = sqlx::query_as(
            "SELECT channel, count(*) FROM deliveries WHERE status IN ('PENDING', 'PROCESSING') GROUP BY channel",
        )
        .fetch_all(&pool)
        .await?;
        for channel in ["IN_APP", "SLACK", "EMAIL"] {
            if !done.contains_key(channel) && !counts.iter().any(|(c, n)| c == channel && *n > 0) {
                done.insert(channel, started.elapsed());
            }
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(900), "timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (channel, count) in [
        ("IN_APP", backlog),
        ("SLACK", backlog),
        ("EMAIL", backlog / 5),
    ] {
        let took = done[channel];
        let failed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM deliveries WHERE channel = $1 AND status <> 'SUCCESS'",
        )
        .bind(channel)
        .fetch_one(&pool)
        .await?;
        println!(
            "dispatch {channel}: {count} deliveries in {:.2} s = {:.0}/s ({failed} not SUCCESS), channels running concurrently",
            took.as_secs_f64(),
            count as f64 / took.as_secs_f64()
        );
    }

    // Phase 2: a steady 200 notifications/s (IN_APP + SLACK) for 10 s; latency from the
    // row's creation to SUCCESS.
    let mark = chrono::Utc::now();
    let rate = support::arg(2, 200)? as u32;
    let tick = Duration::from_secs(1) / rate;
    let mut next = Instant::now();
    for _ in 0..(rate * 10) {
        queue_one(
            &pool,
            &routing,
            &enabled,
            &settings,
            &[Channel::InApp, Channel::Slack],
        )
        .await?;
        next += tick;
        tokio::time::sleep_until(next.into()).await;
    }
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM deliveries WHERE status IN ('PENDING', 'PROCESSING')",
        )
        .fetch_one(&pool)
        .await?;
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (p50, p99): (f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) \
         FROM (SELECT extract(epoch FROM completed_at - created_at) * 1000 AS ms FROM deliveries \
               WHERE created_at >= $1 AND status = 'SUCCESS') t",
    )
    .bind(mark)
    .fetch_one(&pool)
    .await?;
    println!(
        "latency PENDING->SUCCESS at {rate} notifications/s (IN_APP + SLACK): p50 {p50:.1} ms, p99 {p99:.1} ms"
    );
    shutdown.cancel();
    server.await??;
    Ok(())
}

async fn queue(
    pool: &PgPool,
    routing: &RoutingTable,
    enabled: &(dyn Fn(Channel) -> bool + Sync),
    settings: &Settings,
    channel: Channel,
    count: usize,
) -> anyhow::Result<()> {
    for chunk in (0..count).collect::<Vec<_>>().chunks(1000) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|i| notification(routing, enabled, &[channel], *i as i64 % 1000 + 1))
            .collect();
        let mut tx = pool.begin().await?;
        intake::insert(&mut tx, &batch, &settings.kafka.topic_prefix).await?;
        tx.commit().await?;
    }
    Ok(())
}

async fn queue_one(
    pool: &PgPool,
    routing: &RoutingTable,
    enabled: &(dyn Fn(Channel) -> bool + Sync),
    settings: &Settings,
    channels: &[Channel],
) -> anyhow::Result<()> {
    let one = notification(routing, enabled, channels, 7);
    let mut tx = pool.begin().await?;
    intake::insert(&mut tx, &[one], &settings.kafka.topic_prefix).await?;
    tx.commit().await?;
    Ok(())
}

fn notification(
    routing: &RoutingTable,
    enabled: &(dyn Fn(Channel) -> bool + Sync),
    channels: &[Channel],
    user: i64,
) -> intake::NewNotification {
    let draft = Draft {
        source: Source::Api,
        domain: Domain::Api,
        event_id: None,
        event_type: EventType::parse("ORDER_SHIPPED").unwrap(),
        user_id: Some(UserId::new(user).unwrap()),
        recipient: Recipient {
            email: Some(
                herald::domain::EmailAddress::parse(&format!("bench{user}@example.com")).unwrap(),
            ),
            ..Recipient::default()
        },
        data: serde_json::json!({ "orderId": "o-1", "carrier": "CJ" })
            .as_object()
            .unwrap()
            .clone(),
        subject: None,
        body: None,
        raw_event: None,
        origin: None,
        occurred_at: Some(chrono::Utc::now()),
        scheduled_at: None,
        broadcast_id: None,
    };
    intake::prepare(routing, draft, channels, None, &Default::default(), enabled)
}
