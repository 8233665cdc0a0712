//! A dependency goes away under load and comes back: the SMTP sink, Redis, PostgreSQL.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{
    CONCURRENCY, Receivers, Scenario, maildev_clear, maildev_receipts, order_events, wait_until,
};

const TOPIC: &str = "fluxpay.order.events";

/// How long the SMTP sink and Redis stay down.
const OUTAGE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn smtp_sink_down_for_ten_seconds_every_email_is_sent_or_dead_lettered() {
    let scenario = Scenario::start("smtp", &[]).await;
    maildev_clear(&scenario.stack).await;
    // ORDER_COMPLETED goes out as EMAIL only; every user has an address of their own.
    let events = order_events("ORDER_COMPLETED", 400, 400, scenario.tag());
    let (before, during) = events.split_at(200);
    let mut herald = scenario.spawn("a", &[]);

    scenario.publish(TOPIC, before).await;
    let flowing = wait_until(60, || async {
        scenario.deliveries_in("EMAIL", "SUCCESS").await >= 50
    })
    .await;
    assert!(flowing, "emails did not flow; see {}", herald.log.display());
    scenario.stack.stop("smtp");
    let down = Instant::now();
    scenario.publish(TOPIC, during).await;
    tokio::time::sleep_until((down + OUTAGE).into()).await;
    herald.assert_running();
    let failed_during_outage = scenario.retryable_attempts("EMAIL").await;
    scenario.stack.start("smtp");

    let tally = scenario.wait_settled(events.len() as i64, 120).await;
    herald.assert_running();
    // MailDev reloads the mails it kept on disk in the background after its restart.
    let succeeded = tally.count("SUCCESS") as usize;
    wait_until(30, || async {
        maildev_receipts(&scenario.stack).await.distinct() >= succeeded
    })
    .await;
    let audit = scenario
        .audit(&events, &maildev_receipts(&scenario.stack).await)
        .await;
    scenario.report(
        &audit,
        Some(CONCURRENCY),
        &format!(
            "failed attempts during the outage {failed_during_outage}, succeeded {} ({} after a retry), dead-lettered after exhausting retries {}",
            audit.succeeded, audit.retried, audit.dead_lettered
        ),
    );
    audit.assert_kept(scenario.name, events.len(), events.len());
    assert!(
        failed_during_outage > 0,
        "no send failed: the outage was not felt"
    );
    assert_eq!(audit.succeeded + audit.dead_lettered, events.len());
    assert!(audit.duplicate_sends <= CONCURRENCY, "{audit:?}");
}

#[tokio::test]
async fn redis_down_for_ten_seconds_in_app_retries_limits_fail_open_preferences_come_from_postgres()
{
    let receivers = Receivers::start().await;
    let mut settings = receivers.settings("a");
    // Enough retries (1, 2, 4, then 4 s apart) to outlast the outage; a limit that is
    // never reached, to see it fail open.
    settings.push(("HERALD_MAX_RETRIES", "8".into()));
    settings.push(("HERALD_RATE_LIMIT_SMS", "1000/1".into()));
    let scenario = Scenario::start("redis", &settings).await;
    maildev_clear(&scenario.stack).await;
    // ORDER_CANCELLED goes out as IN_APP, SMS and EMAIL; user 7 turned EMAIL off.
    let events = order_events("ORDER_CANCELLED", 300, 50, scenario.tag());
    let opted_out = events.iter().filter(|e| e.key == "7").count();
    let (before, during) = events.split_at(150);
    let mut herald = scenario.spawn("a", &[]);
    herald.wait_status("/health/ready", 200, 30).await;
    let opt_out = herald
        .http
        .put(format!(
            "{}/api/v1/notifications/settings?userId=7",
            herald.address
        ))
        .json(&json!({ "channels": { "EMAIL": false } }))
        .send()
        .await
        .expect("herald answers");
    assert_eq!(opt_out.status(), 200);

    scenario.publish(TOPIC, before).await;
    let flowing = wait_until(60, || async {
        scenario.deliveries_in("IN_APP", "SUCCESS").await >= 30
    })
    .await;
    assert!(flowing, "in-app did not flow; see {}", herald.log.display());
    scenario.stack.stop("redis");
    let down = Instant::now();
    herald.wait_status("/health/ready", 503, 10).await;
    scenario.publish(TOPIC, during).await;
    let ingested = wait_until(OUTAGE.as_secs(), || async {
        scenario
            .tally()
            .await
            .is_ok_and(|t| t.notifications == events.len() as i64)
    })
    .await;
    assert_eq!(herald.status_of("/health/live").await, Some(200));
    tokio::time::sleep_until((down + OUTAGE).into()).await;
    herald.assert_running();
    let sms_while_down = receivers
        .hits()
        .iter()
        .filter(|h| h.channel == "sms" && h.at > down)
        .count();
    let failed_open = herald
        .metric("herald_rate_limit_unavailable_total", "channel=\"SMS\"")
        .await;
    let in_app_failures = scenario.retryable_attempts("IN_APP").await;
    scenario.stack.start("redis");
    herald.wait_status("/health/ready", 200, 30).await;

    scenario.wait_settled(3 * events.len() as i64, 120).await;
    herald.assert_running();
    let receipts = receivers
        .receipts()
        .and(maildev_receipts(&scenario.stack).await);
    let audit = scenario.audit(&events, &receipts).await;
    let in_app = scenario.deliveries_in("IN_APP", "SUCCESS").await;
    scenario.report(
        &audit,
        Some(CONCURRENCY * 3),
        &format!(
            "in-app failed attempts during the outage {in_app_failures} then {in_app} succeeded, \
             SMS sent while the limiter was down {sms_while_down} (fail-open count {failed_open}), \
             emails skipped by preference {}",
            audit.skipped
        ),
    );
    audit.assert_kept(scenario.name, events.len(), 3 * events.len());
    assert!(
        ingested,
        "ingest stopped while Redis was down (preferences must come from PostgreSQL)"
    );
    assert_eq!(
        audit.skipped, opted_out,
        "user 7's emails are skipped, cache or not"
    );
    assert_eq!(
        in_app,
        events.len() as i64,
        "every in-app message went out after the outage"
    );
    assert!(
        in_app_failures > 0,
        "no in-app send failed: the outage was not felt"
    );
    assert!(
        sms_while_down > 0 && failed_open > 0.0,
        "the rate limiter did not fail open"
    );
    assert!(audit.duplicate_sends <= CONCURRENCY * 3, "{audit:?}");
}

#[tokio::test]
async fn postgres_restarted_under_load_consumers_pause_nothing_is_dead_lettered_all_completes() {
    let receivers = Receivers::start().await;
    let scenario = Scenario::start("postgres", &receivers.settings("a")).await;
    let events = order_events("ORDER_SHIPPED", 6_000, 1_000, scenario.tag());
    let (before, during) = events.split_at(3_000);
    let mut herald = scenario.spawn("a", &[]);

    scenario.publish(TOPIC, before).await;
    let flowing = wait_until(60, || async { receivers.count() >= 1_500 }).await;
    assert!(
        flowing,
        "the load did not get going; see {}",
        herald.log.display()
    );
    scenario.stack.stop("postgres");
    let down = Instant::now();
    scenario.publish(TOPIC, during).await;
    tokio::time::sleep_until((down + Duration::from_secs(8)).into()).await;
    herald.assert_running();
    scenario.stack.start("postgres");

    let tally = scenario.wait_settled(2 * events.len() as i64, 180).await;
    herald.assert_running();
    let stalls = herald
        .metric("herald_consumer_stalls_total", "notif-order")
        .await;
    let audit = scenario.audit(&events, &receivers.receipts()).await;
    // Sends whose outcome could not be recorded while PostgreSQL was away go out again
    // once their lease expires: at most the sends in flight.
    let bound = CONCURRENCY * 2;
    scenario.report(
        &audit,
        Some(bound),
        &format!(
            "ingest paused {stalls} times, dead letters {}",
            tally.dead_letters
        ),
    );
    audit.assert_kept(scenario.name, events.len(), 2 * events.len());
    assert_eq!(
        tally.dead_letters, 0,
        "an outage is never the message's fault"
    );
    assert_eq!(audit.succeeded, 2 * events.len());
    assert!(
        stalls > 0.0,
        "the order consumer never paused: the outage was not felt"
    );
    assert!(audit.duplicate_sends <= bound, "{audit:?}");
}
