//! Consumer group membership under faults: the broker frozen for 15 s under load, and
//! PostgreSQL down for longer than `max.poll.interval.ms`. Every consumer group must hold
//! (or get back) its partitions, and readiness must say when one does not.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;
use tokio::task::JoinHandle;

use crate::harness::{CONCURRENCY, Event, Herald, Receivers, Scenario, order_event, wait_until};

/// Every upstream topic with an event type that goes out as SMS and SLACK there
/// (tests/faults/routing.toml).
const UPSTREAM: [(&str, &str); 3] = [
    ("fluxpay.payment.events", "PAYMENT_COMPLETED"),
    ("fluxpay.subscription.events", "SUBSCRIPTION_RENEWED"),
    ("fluxpay.order.events", "ORDER_SHIPPED"),
];
const CHANNELS: usize = 2;
/// Herald's consumer groups, unprefixed.
const GROUPS: [&str; 5] = [
    "notif-payment",
    "notif-subscription",
    "notif-order",
    "notif-readmodel",
    "notif-dlq",
];
/// How long the broker stays frozen.
const STALL: Duration = Duration::from_secs(15);

/// One answer of `/health/ready`.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    status: u16,
    body: Value,
}

/// Polls `/health/ready` every 250 ms in the background.
struct ReadinessLog {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: JoinHandle<()>,
}

impl ReadinessLog {
    fn start(herald: &Herald) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let url = format!("{}/health/ready", herald.address);
        let task = tokio::spawn({
            let samples = samples.clone();
            async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("an HTTP client");
                loop {
                    if let Ok(response) = http.get(&url).send().await {
                        let status = response.status().as_u16();
                        let body = response.json().await.unwrap_or(Value::Null);
                        samples.lock().unwrap().push(Sample {
                            at: Instant::now(),
                            status,
                            body,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        ReadinessLog { samples, task }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    fn last(&self) -> Option<Sample> {
        self.samples.lock().unwrap().last().cloned()
    }
}

impl Drop for ReadinessLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether the readiness body shows every consumer group of the scenario with an assignment.
fn all_assigned(body: &Value, prefix: &str) -> bool {
    GROUPS
        .iter()
        .all(|group| body["consumers"][format!("{prefix}{group}")]["state"] == "assigned")
}

/// `count` events of each upstream topic, in publishing order per topic.
fn load(count: usize, tag: &str) -> Vec<(&'static str, Vec<Event>)> {
    UPSTREAM
        .iter()
        .map(|(topic, event_type)| {
            let events = (0..count)
                .map(|i| order_event(event_type, 1 + i as i64 % 500, tag))
                .collect();
            (*topic, events)
        })
        .collect()
}

async fn publish_all(scenario: &Scenario, load: &[(&'static str, Vec<Event>)]) {
    for (topic, events) in load {
        scenario.publish(topic, events).await;
    }
}

/// `per_topic` undecodable messages on every upstream topic: dead letters at once.
async fn publish_poison(scenario: &Scenario, per_topic: usize, phase: &str) {
    for (topic, _) in UPSTREAM {
        let poison: Vec<(String, Vec<u8>)> = (0..per_topic)
            .map(|i| (i.to_string(), format!("not json {phase} {i}").into_bytes()))
            .collect();
        scenario.publish_raw(topic, &poison).await;
    }
}

/// Deliveries whose read-model row shows their current status.
async fn projected(scenario: &Scenario) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM deliveries d JOIN notification_log l ON l.delivery_id = d.id \
         WHERE l.status = d.status",
    )
    .fetch_one(&scenario.db)
    .await
    .unwrap_or(0)
}

#[tokio::test]
#[ignore = "Tansu 0.6.0 keeps naming as leader of a forming group a member that is gone \
            (coordinator/group/administrator.rs: Forming::leave does not clear state.leader), \
            and after a 15 s stall its groups end up there: every join is answered 'rebalance \
            in progress' for good, whoever joins. Run it with \
            `scripts/faults.sh --ignored broker_frozen` against a broker without that bug."]
async fn broker_frozen_fifteen_seconds_under_load_every_group_is_assigned_again_readiness_tells_and_nothing_is_lost()
 {
    let receivers = Receivers::start().await;
    let scenario = Scenario::start("stall", &receivers.settings("a")).await;
    let before = load(300, scenario.tag());
    let during = load(300, scenario.tag());
    let after = load(300, scenario.tag());
    const POISON: usize = 5;
    let events: Vec<Event> = [&before, &during, &after]
        .iter()
        .flat_map(|phase| phase.iter().flat_map(|(_, events)| events.clone()))
        .collect();
    let mut herald = scenario.spawn("a", &[]);
    herald.wait_status("/health/ready", 200, 30).await;
    let readiness = ReadinessLog::start(&herald);
    let joined = wait_until(60, || async {
        readiness
            .last()
            .is_some_and(|s| all_assigned(&s.body, &scenario.prefix))
    })
    .await;
    assert!(
        joined,
        "the groups were not assigned at start: {:?}; see {}",
        readiness.last(),
        herald.log.display()
    );

    publish_all(&scenario, &before).await;
    publish_poison(&scenario, POISON, "before").await;
    let flowing = wait_until(60, || async { receivers.count() >= 600 }).await;
    assert!(
        flowing,
        "the load did not get going; see {}",
        herald.log.display()
    );

    scenario.stack.pause_broker();
    let paused = Instant::now();
    // Upstream keeps publishing: the producer holds the events until the broker answers.
    let ((), ()) = tokio::join!(publish_all(&scenario, &during), async {
        tokio::time::sleep(STALL).await;
        scenario.stack.resume_broker();
    });
    let resumed = paused + STALL;
    herald.assert_running();

    // Every group holds partitions again within a minute of the resume.
    let healed = wait_until(120, || async {
        readiness
            .last()
            .is_some_and(|s| s.at > resumed && all_assigned(&s.body, &scenario.prefix))
    })
    .await;
    let healed_after = readiness
        .samples()
        .into_iter()
        .find(|s| s.at > resumed && all_assigned(&s.body, &scenario.prefix))
        .map(|s| s.at.duration_since(resumed));
    assert!(
        healed,
        "not every group was assigned again: {:?}; see {}",
        readiness.last(),
        herald.log.display()
    );

    publish_all(&scenario, &after).await;
    publish_poison(&scenario, POISON, "after").await;
    let expected = events.len() * CHANNELS;
    let tally = scenario.wait_settled(expected as i64, 180).await;
    herald.assert_running();
    let caught_up = wait_until(60, || async {
        projected(&scenario).await == expected as i64
    })
    .await;
    let listed = herald.dead_letters().await.len();
    herald.wait_status("/health/ready", 200, 60).await;

    let samples = readiness.samples();
    let unready: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= paused && s.status == 503)
        .collect();
    let reasons: BTreeSet<String> = unready
        .iter()
        .filter_map(|s| s.body["error"]["message"].as_str())
        .map(|m| {
            // "not ready: PREFIX.notif-order: no assignment for 31 s" -> the group's part.
            let m = m.replace(&scenario.prefix, "");
            m.split(" for ").next().unwrap_or_default().to_owned()
        })
        .collect();
    let recreations = herald
        .metric("herald_consumer_recreations_total", &scenario.prefix)
        .await;
    let lost_assignments = herald
        .metric("herald_consumer_rebalances_total", "kind=\"lost\"")
        .await;
    let audit = scenario.audit(&events, &receivers.receipts()).await;
    let bound = CONCURRENCY * CHANNELS;
    scenario.report(
        &audit,
        Some(bound),
        &format!(
            "every group assigned again {:.0} s after the resume, assignments lost {lost_assignments}, \
             consumers recreated {recreations}, readiness 503 for {} samples ({}), dead letters {} \
             stored {} listed {listed}, read model caught up {caught_up}",
            healed_after.unwrap_or_default().as_secs_f64(),
            unready.len(),
            reasons.into_iter().collect::<Vec<_>>().join("; "),
            tally.dead_letters,
            tally.dlq_messages,
        ),
    );
    audit.assert_kept(scenario.name, events.len(), expected);
    assert_eq!(audit.succeeded, expected, "{audit:?}");
    assert!(audit.duplicate_sends <= bound, "{audit:?}");
    assert!(
        healed_after.is_some_and(|d| d <= Duration::from_secs(60)),
        "the groups took {healed_after:?} to be assigned again"
    );
    assert!(
        !unready.is_empty(),
        "readiness never answered 503 while the broker was frozen"
    );
    assert!(caught_up, "the read model did not catch up");
    let poison = (2 * POISON * UPSTREAM.len()) as i64;
    assert_eq!(tally.dead_letters, poison, "{tally:?}");
    assert_eq!(tally.dlq_messages, poison, "{tally:?}");
    assert_eq!(
        listed, poison as usize,
        "the admin API lists every dead letter"
    );
}

#[tokio::test]
async fn postgres_down_longer_than_max_poll_interval_consumers_keep_their_partitions_and_nothing_is_lost()
 {
    let receivers = Receivers::start().await;
    let mut settings = receivers.settings("a");
    // The shortest librdkafka allows (the session timeout is 6 s); the outage is 20 s.
    settings.push(("HERALD_KAFKA_MAX_POLL_INTERVAL_MS", "8000".into()));
    let scenario = Scenario::start("pollinterval", &settings).await;
    let events: Vec<Event> = (0..3_000)
        .map(|i| order_event("ORDER_SHIPPED", 1 + i % 1_000, scenario.tag()))
        .collect();
    let (before, during) = events.split_at(1_500);
    let mut herald = scenario.spawn("a", &[]);
    herald.wait_status("/health/ready", 200, 30).await;
    let readiness = ReadinessLog::start(&herald);
    let joined = wait_until(60, || async {
        readiness
            .last()
            .is_some_and(|s| all_assigned(&s.body, &scenario.prefix))
    })
    .await;
    assert!(joined, "the groups were not assigned at start");
    let rebalances_at_start = herald
        .metric("herald_consumer_rebalances_total", &scenario.prefix)
        .await;

    scenario.publish("fluxpay.order.events", before).await;
    let flowing = wait_until(60, || async { receivers.count() >= 500 }).await;
    assert!(
        flowing,
        "the load did not get going; see {}",
        herald.log.display()
    );
    scenario.stack.stop("postgres");
    let down = Instant::now();
    scenario.publish("fluxpay.order.events", during).await;
    tokio::time::sleep_until((down + Duration::from_secs(20)).into()).await;
    herald.assert_running();
    scenario.stack.start("postgres");

    let tally = scenario
        .wait_settled((events.len() * CHANNELS) as i64, 180)
        .await;
    herald.assert_running();
    // Counted after the outage: a member evicted for not polling learns it (and its
    // rebalance callback runs) only at its next poll, once the batch went through.
    let rebalances = herald
        .metric("herald_consumer_rebalances_total", &scenario.prefix)
        .await
        - rebalances_at_start;
    let outage: Vec<Sample> = readiness
        .samples()
        .into_iter()
        .filter(|s| s.at > down && s.at < down + Duration::from_secs(20))
        .collect();
    let order_group = format!("{}notif-order", scenario.prefix);
    let held_throughout = outage
        .iter()
        .all(|s| s.body["consumers"][&order_group]["state"] == "assigned");
    let waited = outage
        .iter()
        .any(|s| s.body["consumers"][&order_group]["waitingOnHandler"] == true);
    let paused_log = herald
        .log_records("batch still waiting; partitions paused, membership kept")
        .len();
    let audit = scenario.audit(&events, &receivers.receipts()).await;
    let bound = CONCURRENCY * CHANNELS;
    scenario.report(
        &audit,
        Some(bound),
        &format!(
            "outage 20 s with max.poll.interval.ms 8000, rebalances since the outage \
             began {rebalances}, notif-order held its partitions in {} readiness samples, \
             paused {paused_log} times, dead letters {}",
            outage.len(),
            tally.dead_letters
        ),
    );
    audit.assert_kept(scenario.name, events.len(), events.len() * CHANNELS);
    assert_eq!(
        tally.dead_letters, 0,
        "an outage is never the message's fault"
    );
    assert!(
        waited && paused_log > 0,
        "the order consumer never waited on PostgreSQL: the outage was not felt"
    );
    assert!(
        !outage.is_empty(),
        "readiness did not answer during the outage"
    );
    assert_eq!(
        rebalances, 0.0,
        "a consumer lost or gave up its partitions because of the outage"
    );
    assert!(
        held_throughout,
        "notif-order was without partitions during the outage"
    );
    assert!(audit.duplicate_sends <= bound, "{audit:?}");
}
