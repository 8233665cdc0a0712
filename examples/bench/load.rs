//! Offered load: upstream events as the envelope of DESIGN §2, published to Kafka either
//! all at once (a backlog) or on a fixed schedule (open loop), and HTTP intake requests on
//! a fixed schedule.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use herald::config::KafkaSettings;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio::task::JoinSet;

/// Users the events are spread over (the Kafka key, so over partitions too).
const USERS: usize = 5000;

/// The producer the generators share: batching for backlogs, no linger for open loop.
pub fn producer(settings: &KafkaSettings, linger_ms: u32) -> anyhow::Result<FutureProducer> {
    Ok(herald::kafka::client_config(settings)
        .set("linger.ms", linger_ms.to_string())
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

/// One upstream event: its Kafka key and JSON bytes.
pub fn event(
    tag: &str,
    i: usize,
    event_type: &str,
    occurred_at: DateTime<Utc>,
) -> (String, String) {
    let user = i % USERS + 1;
    let payload = serde_json::json!({
        "eventId": format!("{tag}-{i}"),
        "eventType": event_type,
        "occurredAt": occurred_at.to_rfc3339(),
        "userId": user,
        "recipient": { "email": format!("u{user}@example.com"), "locale": "en" },
        "data": { "orderId": format!("o-{i}"), "amount": 12000, "currency": "KRW" }
    })
    .to_string();
    (user.to_string(), payload)
}

/// Publishes `count` events as fast as the producer takes them and waits for every ack.
pub async fn backlog(
    producer: &FutureProducer,
    topic: &str,
    tag: &str,
    event_type: &str,
    count: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut acks = Vec::with_capacity(count);
    for i in 0..count {
        let (key, payload) = event(tag, i, event_type, Utc::now());
        acks.push(
            producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
                .map_err(|(e, _)| e)?,
        );
    }
    for ack in acks {
        ack.await?.map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(started.elapsed())
}

/// Publishes `rate` events per second for `duration` on a fixed schedule, whatever Herald
/// does meanwhile. Each event's occurredAt is its scheduled time, so a late publish (or a
/// slow Herald) shows up in the latency instead of slowing the offered load.
pub async fn open_loop(
    producer: &FutureProducer,
    topic: &str,
    tag: &str,
    event_type: &str,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<usize> {
    let total = (rate as f64 * duration.as_secs_f64()) as usize;
    let interval = Duration::from_secs(1) / rate;
    let start = Instant::now();
    let start_wall = Utc::now();
    let mut acks = Vec::with_capacity(total);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0;
    while sent < total {
        ticker.tick().await;
        // Everything whose time has come, even if this task woke late.
        let due =
            ((start.elapsed().as_secs_f64() / interval.as_secs_f64()) as usize + 1).min(total);
        while sent < due {
            let scheduled = start_wall + interval * sent as u32;
            let (key, payload) = event(tag, sent, event_type, scheduled);
            acks.push(
                producer
                    .send_result(FutureRecord::to(topic).key(&key).payload(&payload))
                    .map_err(|(e, _)| e)?,
            );
            sent += 1;
        }
    }
    for ack in acks {
        ack.await?.map_err(|(e, _)| e)?;
    }
    Ok(sent)
}

/// Latencies (ms) and failures of HTTP intake requests sent on a fixed schedule.
pub struct IntakeResult {
    pub latencies_ms: Vec<f64>,
    /// Failures by kind: the status Herald answered, or how the request failed without one.
    pub failure_kinds: std::collections::BTreeMap<String, usize>,
}

/// POSTs `rate` notifications per second to `/api/v1/notifications` for `duration`. Each
/// request is timed from its scheduled send time, not from when it actually left, so that
/// a stalled server cannot hide its queue (no coordinated omission). With `keyed`, each
/// request carries an `Idempotency-Key` of its own, as an upstream that retries safely sends.
pub async fn intake(
    base: &str,
    credential: &str,
    tag: &str,
    rate: u32,
    duration: Duration,
    keyed: bool,
) -> anyhow::Result<IntakeResult> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("{base}/api/v1/notifications");
    let total = (rate as f64 * duration.as_secs_f64()) as usize;
    let interval = Duration::from_secs(1) / rate;
    let start = tokio::time::Instant::now();
    let mut requests = JoinSet::new();
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (client, url, bearer) = (client.clone(), url.clone(), credential.to_owned());
        let order = format!("{tag}-http-{i}");
        let key = keyed.then(|| order.clone());
        let body = serde_json::json!({
            "userId": i % USERS + 1,
            "channels": ["IN_APP"],
            "eventType": "ORDER_SHIPPED",
            "data": { "orderId": order }
        });
        requests.spawn(async move {
            let mut request = client.post(&url).bearer_auth(bearer).json(&body);
            if let Some(key) = key {
                request = request.header("Idempotency-Key", key);
            }
            let failure = match request.send().await {
                Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => None,
                Ok(r) => Some(r.status().as_u16().to_string()),
                Err(e) if e.is_timeout() => Some("timeout".to_owned()),
                Err(e) if e.is_connect() => Some("connect".to_owned()),
                Err(_) => Some("other".to_owned()),
            };
            (failure, scheduled.elapsed())
        });
    }
    let mut result = IntakeResult {
        latencies_ms: Vec::with_capacity(total),
        failure_kinds: Default::default(),
    };
    while let Some(done) = requests.join_next().await {
        match done? {
            (None, took) => result.latencies_ms.push(took.as_secs_f64() * 1000.0),
            (Some(kind), _) => *result.failure_kinds.entry(kind).or_default() += 1,
        }
    }
    Ok(result)
}

/// The value at quantile `q` (0..=1) of unsorted samples (nearest rank).
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}
