//! The broker loses its data while Herald runs (Tansu restarted: every topic empty, every
//! consumer group forgotten), then Herald is restarted too. Offsets start again at 0, so a
//! new dead letter lands where an old one was: the DLQ store must keep both.

use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

use crate::harness::{Event, Herald, Receivers, Scenario, order_events, wait_until};

const TOPIC: &str = "fluxpay.order.events";
/// ORDER_SHIPPED events per phase; each yields an SMS (sent) and a SLACK message (refused
/// by the webhook: dead-lettered).
const PER_PHASE: usize = 40;
/// The same poison bytes, published once in each phase.
const POISON: &[u8] = b"{\"eventType\": \"ORDER_SHIPPED\", not json";

/// The dead letters the admin API lists: (dead-letter id, delivery id or None).
async fn listed(herald: &Herald) -> Vec<(String, Option<String>)> {
    herald
        .dead_letters()
        .await
        .iter()
        .map(|l| {
            (
                l["deadLetterId"].as_str().unwrap_or_default().to_owned(),
                l["deliveryId"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// Publishes a phase's events and its poison message, then waits until every delivery is
/// settled and the admin API lists `phase` phases' worth of dead letters.
async fn run_phase(scenario: &Scenario, herald: &mut Herald, phase: usize, events: &[Event]) {
    scenario.publish(TOPIC, events).await;
    scenario
        .publish_raw(TOPIC, &[("1".to_owned(), POISON.to_vec())])
        .await;
    scenario
        .wait_settled((2 * PER_PHASE * phase) as i64, 180)
        .await;
    let expected = (PER_PHASE + 1) * phase;
    let complete = wait_until(60, || async { listed(herald).await.len() >= expected }).await;
    herald.assert_running();
    let letters = listed(herald).await;
    assert!(
        complete,
        "phase {phase}: {} dead letters listed, expected {expected}; see {}",
        letters.len(),
        herald.log.display()
    );
    assert_eq!(
        letters.len(),
        expected,
        "phase {phase}: a letter listed twice"
    );
    let mut ids: Vec<&str> = letters.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), expected, "phase {phase}: two letters merged");
    let poison = letters.iter().filter(|(_, d)| d.is_none()).count();
    assert_eq!(
        poison, phase,
        "phase {phase}: each poison copy is its own letter"
    );
}

#[tokio::test]
async fn broker_emptied_while_herald_runs_then_herald_restarted_every_dead_letter_is_listed_once() {
    let receivers = Receivers::start().await;
    let refusing = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400))
        .mount(&refusing)
        .await;
    let mut settings = receivers.settings("a");
    settings.retain(|(name, _)| *name != "HERALD_SLACK_WEBHOOK_URL");
    settings.push((
        "HERALD_SLACK_WEBHOOK_URL",
        format!("{}/slack", refusing.uri()),
    ));
    let scenario = Scenario::start("broker", &settings).await;
    let events = order_events("ORDER_SHIPPED", 3 * PER_PHASE, 40, scenario.tag());
    let phases: Vec<&[Event]> = events.chunks(PER_PHASE).collect();

    let mut herald = scenario.spawn("a", &[]);
    run_phase(&scenario, &mut herald, 1, phases[0]).await;

    // The broker loses everything while Herald runs; the topics are created again as
    // `make run` does at its start.
    scenario.stack.stop("kafka");
    scenario.stack.start("kafka");
    scenario.create_topics();
    herald.assert_running();
    run_phase(&scenario, &mut herald, 2, phases[1]).await;
    let producers_remade = herald
        .log_records("no acknowledgement from Kafka; making a new producer")
        .len()
        + herald
            .log_records("the Kafka producer failed; making a new one")
            .len();

    // Herald restarted: its consumer groups resume on the new topics.
    herald.terminate(30).await.expect("herald stops on SIGTERM");
    let mut herald = scenario.spawn("a", &[]);
    run_phase(&scenario, &mut herald, 3, phases[2]).await;

    let audit = scenario.audit(&events, &receivers.receipts()).await;
    scenario.report(
        &audit,
        None,
        &format!(
            "dead letters {} (poison {}), producer remade {} times",
            audit.dead_lettered + 3,
            3,
            producers_remade
        ),
    );
    audit.assert_kept(scenario.name, events.len(), 2 * events.len());
    assert_eq!(audit.succeeded, events.len(), "every SMS went out");
    assert_eq!(
        audit.dead_lettered,
        events.len(),
        "every SLACK failure is stored"
    );
}
