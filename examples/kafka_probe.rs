//! How long a record takes from a producer to a consumer through the broker, at several
//! `fetch.wait.max.ms` values: the floor under the "occurredAt to stored" part of Herald's
//! latency (BENCHMARKS.md, "The broker's share").
//!
//! One record every 10 ms for 3 s per wait, on a topic of one partition made for the run
//! (left behind: deleting it at the end crashed this probe, a segfault in librdkafka, against
//! Tansu 0.6).
//! Kafka answers a fetch as soon as a record arrives, so there the figures stay near the
//! network round trip whatever the wait. Tansu 0.6 answers when the wait has passed.
//!
//! ```sh
//! eval "$(scripts/stack.sh env bench | sed 's/^/export /')"
//! cargo run --release --example kafka_probe -- 5 20 100
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rdkafka::{
    ClientConfig, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};

const RECORDS: usize = 300;
const EVERY: Duration = Duration::from_millis(10);

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}

/// Milliseconds from send to receive of each record, at `wait` ms of fetch wait.
async fn probe(brokers: &str, wait: u32) -> anyhow::Result<Vec<f64>> {
    let topic = format!("herald-probe-{}", now_us());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new = NewTopic::new(&topic, 1, TopicReplication::Fixed(1));
    admin.create_topics(&[new], &AdminOptions::new()).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .create()?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", &topic)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", wait.to_string())
        .create()?;
    consumer.subscribe(&[&topic])?;
    let sending = {
        let topic = topic.clone();
        tokio::spawn(async move {
            // Let the consumer join its group first, so no record waits for the join.
            tokio::time::sleep(Duration::from_secs(3)).await;
            for _ in 0..RECORDS {
                let sent = now_us().to_string();
                let record = FutureRecord::to(&topic).key("probe").payload(&sent);
                producer
                    .send(record, Duration::from_secs(5))
                    .await
                    .map_err(|(e, _)| e)?;
                tokio::time::sleep(EVERY).await;
            }
            anyhow::Ok(())
        })
    };
    let mut latencies = Vec::with_capacity(RECORDS);
    while latencies.len() < RECORDS {
        let record = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .context("no record within 20 s")??;
        let sent: u128 = std::str::from_utf8(record.payload().unwrap_or_default())?.parse()?;
        latencies.push(now_us().saturating_sub(sent) as f64 / 1000.0);
    }
    sending.await??;
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let brokers =
        std::env::var("HERALD_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let waits: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().context("each argument is a fetch wait in ms"))
        .collect::<anyhow::Result<_>>()?;
    for wait in if waits.is_empty() { vec![20] } else { waits } {
        let l = probe(&brokers, wait).await?;
        let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize];
        println!(
            "fetch.wait.max.ms={wait}: send to receive p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms ({} records, one every {} ms)",
            at(0.5),
            at(0.9),
            at(0.99),
            l.len(),
            EVERY.as_millis()
        );
    }
    Ok(())
}
