//! Herald killed with SIGKILL in the middle of a load, then restarted.

use crate::harness::{CONCURRENCY, Receivers, Scenario, order_events, wait_until};

const EVENTS: usize = 20_000;
/// ORDER_SHIPPED goes out as SMS and SLACK (tests/faults/routing.toml).
const CHANNELS: usize = 2;

#[tokio::test]
async fn sigkill_mid_load_then_restart_loses_nothing_and_resends_at_most_the_sends_in_flight() {
    let receivers = Receivers::start().await;
    let scenario = Scenario::start("sigkill", &receivers.settings("a")).await;
    let events = order_events("ORDER_SHIPPED", EVENTS, 1_000, scenario.tag());
    let expected = EVENTS * CHANNELS;

    let mut herald = scenario.spawn("a", &[]);
    scenario.publish("fluxpay.order.events", &events).await;
    let started = wait_until(120, || async { receivers.count() >= expected / 10 }).await;
    herald.assert_running();
    assert!(
        started,
        "the load did not get going; see {}",
        herald.log.display()
    );
    herald.kill();
    let sent_at_kill = receivers.count();
    let stored_at_kill = scenario.tally().await.expect("the database answers");
    assert!(
        sent_at_kill < expected,
        "the kill came after the load was done ({sent_at_kill} sends)"
    );

    // Restart once the dead member's session (6 s) has expired. Tansu 0.6 does not evict a
    // dead member whose session runs out while a new one has already joined: in one run
    // the restarted instance was given 0 partitions and never got more (real Kafka
    // rebalances after the timeout). An orchestrator's restart takes this long anyway.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let mut restarted = scenario.spawn("a", &[]);
    let tally = scenario.wait_settled(expected as i64, 300).await;
    restarted.assert_running();
    let audit = scenario.audit(&events, &receivers.receipts()).await;
    // A send that reached the receiver but whose outcome the killed process had not yet
    // recorded is sent again after the lease runs out: at most the sends in flight, which
    // is the dispatch concurrency of each channel.
    let bound = CONCURRENCY * CHANNELS;
    scenario.report(
        &audit,
        Some(bound),
        &format!(
            "killed after {sent_at_kill} sends and {} notifications, {} succeeded",
            stored_at_kill.notifications,
            tally.count("SUCCESS")
        ),
    );
    audit.assert_kept(scenario.name, EVENTS, expected);
    assert_eq!(audit.succeeded, expected, "{audit:?}");
    assert!(audit.duplicate_sends <= bound, "{audit:?}");
}
