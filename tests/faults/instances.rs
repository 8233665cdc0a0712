//! Three Herald instances share one load (one database, one set of consumer groups); one
//! of them is stopped with SIGTERM halfway.

use std::{collections::BTreeMap, time::Duration};

use crate::harness::{Herald, Hit, Receivers, Scenario, order_events, wait_until};

const EVENTS: usize = 2_000;
/// SMS sends allowed per second across the instances.
const SMS_PER_SECOND: usize = 100;
const INSTANCES: [&str; 3] = ["a", "b", "c"];

#[tokio::test]
async fn three_instances_send_each_delivery_once_spread_the_work_hold_the_shared_limit_and_hand_over_on_sigterm()
 {
    let receivers = Receivers::start().await;
    let limit = format!("{SMS_PER_SECOND}/1");
    let scenario = Scenario::start("instances", &[("HERALD_RATE_LIMIT_SMS", limit)]).await;
    let events = order_events("ORDER_SHIPPED", EVENTS, 1_000, scenario.tag());
    let (first, second) = events.split_at(EVENTS / 2);
    // Each instance sends to URLs of its own, so the receivers tell who sent what.
    let mut herald: Vec<Herald> = INSTANCES
        .iter()
        .map(|name| scenario.spawn(name, &receivers.settings(name)))
        .collect();
    for instance in &mut herald {
        instance.wait_status("/health/live", 200, 30).await;
    }

    scenario.publish("fluxpay.order.events", first).await;
    let mut leaving = herald.pop().expect("three instances");
    // Instance c leaves once it owns order partitions and has sent some of the load.
    let joined = wait_until(60, || async {
        assigned_partitions(&leaving, &scenario.prefix) > 0
            && receivers
                .hits()
                .iter()
                .filter(|h| h.instance == "c")
                .count()
                >= 20
    })
    .await;
    assert!(
        joined,
        "instance c did not join in; see {}",
        leaving.log.display()
    );
    let owned_order_partitions = assigned_partitions(&leaving, &scenario.prefix);
    let exit = leaving.terminate(15).await;
    // The two that stay take over every order partition (the topic has 6).
    let taken_over = wait_until(30, || async {
        herald
            .iter()
            .map(|h| assigned_partitions(h, &scenario.prefix))
            .sum::<u64>()
            == 6
    })
    .await;
    scenario.publish("fluxpay.order.events", second).await;

    scenario.wait_settled(2 * EVENTS as i64, 180).await;
    for instance in &mut herald {
        instance.assert_running();
    }
    let hits = receivers.hits();
    let audit = scenario.audit(&events, &receivers.receipts()).await;
    let mut per_instance: BTreeMap<&str, usize> = INSTANCES.iter().map(|i| (*i, 0)).collect();
    for hit in &hits {
        *per_instance.entry(hit.instance.as_str()).or_default() += 1;
    }
    let busiest_second = busiest_window(&hits, "sms", Duration::from_secs(1));
    let busiest_admitted = scenario.busiest_second_of_attempts("SMS").await as usize;
    // No instance sends a delivery another one owns; the only second sends are retries
    // after an attempt whose outcome Herald could not know (a send timeout), which the
    // receiver drops by idempotency key.
    let failed_attempts = (scenario.retryable_attempts("SMS").await
        + scenario.retryable_attempts("SLACK").await) as usize;
    // A limiter check Redis does not answer in time admits the send (fail open, as
    // documented); a stalled host can cause one. Each is logged and counted here.
    let fail_open = herald
        .iter()
        .chain([&leaving])
        .flat_map(|h| h.log_records("rate limiter unavailable; admitting the send"))
        .filter(|record| record["channel"] == "SMS")
        .count();
    scenario.report(
        &audit,
        Some(failed_attempts),
        &format!(
            "sends per instance {per_instance:?}, most SMS started in one second {busiest_admitted} and received in one second {busiest_second} (limit {SMS_PER_SECOND}, admitted by failing open {fail_open}), \
             c exited {exit:?} owning {owned_order_partitions} order partitions, a and b own all 6 after: {taken_over}"
        ),
    );
    audit.assert_kept(scenario.name, EVENTS, 2 * EVENTS);
    assert_eq!(
        audit.duplicate_sends, 0,
        "a delivery was sent twice: {audit:?}"
    );
    assert!(
        per_instance.values().all(|n| *n > 0),
        "the work was not spread: {per_instance:?}"
    );
    assert!(
        busiest_admitted <= SMS_PER_SECOND + fail_open,
        "the shared SMS limiter admitted {busiest_admitted} in one second ({fail_open} by failing open)"
    );
    // At the receiver, sends bunch up when their time in transit varies by more than the
    // limiter's 250 ms guard, which a loaded 2-core host does now and then (102 once):
    // allowed up to a tenth over, and the figure is printed.
    assert!(
        busiest_second <= SMS_PER_SECOND + SMS_PER_SECOND / 10 + fail_open,
        "the shared SMS limit was exceeded at the receiver: {busiest_second} in one second"
    );
    assert!(
        exit.is_some_and(|status| status.success()),
        "instance c did not exit 0 within its grace period: {exit:?}; see {}",
        leaving.log.display()
    );
    assert!(
        taken_over,
        "a and b did not take over every order partition"
    );
}

/// The most requests of `channel` the receivers took within any `window`.
fn busiest_window(hits: &[Hit], channel: &str, window: Duration) -> usize {
    let mut times: Vec<_> = hits
        .iter()
        .filter(|h| h.channel == channel)
        .map(|h| h.at)
        .collect();
    times.sort();
    let mut busiest = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= window {
            start += 1;
        }
        busiest = busiest.max(end - start + 1);
    }
    busiest
}

/// How many order-topic partitions `herald` was assigned last, as its log says.
fn assigned_partitions(herald: &Herald, prefix: &str) -> u64 {
    let group = format!("{prefix}notif-order");
    herald
        .log_records("partitions assigned")
        .iter()
        .filter(|record| record["group"] == group.as_str())
        .filter_map(|record| record["partitions"].as_u64())
        .next_back()
        .unwrap_or(0)
}
