//! A digest's window with Herald killed in the middle of it (issue 18): its members are
//! rows from the moment their event is accepted, so the restarted instance sends exactly
//! one message listing every one of them.

use std::time::Duration;

use crate::harness::{Receivers, Scenario, order_event, wait_until};

const USER: i64 = 4242;

#[tokio::test]
async fn a_digest_killed_half_way_through_its_window_still_sends_exactly_one_message() {
    let receivers = Receivers::start().await;
    let scenario = Scenario::start("digest", &receivers.settings("a")).await;
    let routing = [(
        "HERALD_ROUTING_FILE",
        "tests/faults/routing-digest.toml".to_owned(),
    )];
    let first: Vec<_> = (0..4)
        .map(|_| order_event("ORDER_SHIPPED", USER, scenario.tag()))
        .collect();
    let second: Vec<_> = (0..3)
        .map(|_| order_event("ORDER_SHIPPED", USER, scenario.tag()))
        .collect();

    let mut herald = scenario.spawn("a", &routing);
    scenario.publish("fluxpay.order.events", &first).await;
    let held = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM deliveries WHERE status = 'PENDING' AND hold_reason = 'digest'",
        )
        .fetch_one(&scenario.db)
        .await
        .unwrap_or_default()
    };
    assert!(
        wait_until(60, || async { held().await == 4 }).await,
        "the first four did not join a digest; see {}",
        herald.log.display()
    );
    herald.assert_running();
    herald.kill();
    assert_eq!(
        receivers.count(),
        0,
        "nothing is sent before the window closes"
    );

    // Restart once the dead member's session has expired (see sigkill.rs), then the rest.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut restarted = scenario.spawn("a", &routing);
    scenario.publish("fluxpay.order.events", &second).await;
    let tally = scenario.wait_settled(7, 150).await;
    restarted.assert_running();
    assert_eq!(tally.count("SUCCESS"), 7, "{tally:?}");
    // Late requests, if any, would come now.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let hits = receivers.hits();
    let digests: Vec<(uuid::Uuid, i64)> =
        sqlx::query_as("SELECT digest_id, count(*) FROM deliveries GROUP BY digest_id")
            .fetch_all(&scenario.db)
            .await
            .unwrap();
    let orders: Vec<String> = sqlx::query_scalar("SELECT data->>'orderId' FROM notifications")
        .fetch_all(&scenario.db)
        .await
        .unwrap();
    println!(
        "fault digest: 7 events, killed after 4 joined; {} message(s) sent; digests {:?}",
        hits.len(),
        digests
    );
    assert_eq!(digests.len(), 1, "all seven in one digest: {digests:?}");
    assert_eq!(digests[0].1, 7);
    assert_eq!(hits.len(), 1, "exactly one message: {hits:?}");
    assert_eq!(orders.len(), 7);
    for order in &orders {
        assert!(
            hits[0].text.contains(order.as_str()),
            "{order} is listed: {}",
            hits[0].text
        );
    }
}
