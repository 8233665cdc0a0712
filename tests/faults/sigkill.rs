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

/// 1,000 SMS refused for good by the gateway and 20 poison messages of two kinds: three
/// causes, read as three fingerprints. The gateway fixed, the SMS are replayed at 50 a
/// second by filter; Herald is killed half way and restarted: the replay goes on from where
/// it was, and no letter is replayed twice (issue 16).
#[tokio::test]
async fn a_replay_killed_half_way_resumes_after_restart_and_replays_each_letter_once() {
    use serde_json::{Value, json};
    use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

    const LETTERS: usize = 1_000;
    const RATE: usize = 50;
    let receivers = Receivers::start().await;
    let refusing = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string("unknown number"))
        .mount(&refusing)
        .await;
    let scenario = Scenario::start("replay", &receivers.settings("a")).await;
    let events = order_events("ORDER_SHIPPED", LETTERS, 1_000, scenario.tag());

    // The gateway refuses every SMS: 1,000 dead letters.
    let mut herald = scenario.spawn(
        "a",
        &[("HERALD_SMS_GATEWAY_URL", format!("{}/sms", refusing.uri()))],
    );
    scenario.publish("fluxpay.order.events", &events).await;
    let poison: Vec<(String, Vec<u8>)> = (0..10)
        .flat_map(|i| {
            [
                (i.to_string(), format!("{{not json {i}").into_bytes()),
                (
                    i.to_string(),
                    json!({ "eventId": format!("unknown-{i}"), "eventType": "ORDER_LOST",
                        "occurredAt": "2026-12-01T09:30:00Z", "userId": i + 1, "data": {} })
                    .to_string()
                    .into_bytes(),
                ),
            ]
        })
        .collect();
    scenario.publish_raw("fluxpay.order.events", &poison).await;
    let pending = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM dlq_messages WHERE status = 'PENDING' AND failed_channel = 'SMS'",
        )
        .fetch_one(&scenario.db)
        .await
        .unwrap_or(0)
    };
    assert!(
        wait_until(180, || async { pending().await == LETTERS as i64 }).await,
        "{} of {LETTERS} dead letters; see {}",
        pending().await,
        herald.log.display()
    );
    herald.terminate(20).await;

    // The gateway is fixed; the operator checks, then replays at 50 a second.
    let mut herald = scenario.spawn("a", &[]);
    herald.wait_status("/health/ready", 200, 60).await;
    let replay = |body: Value| {
        let (http, address) = (herald.http.clone(), herald.address.clone());
        async move {
            let response = http
                .post(format!("{address}/api/v1/admin/dlq/replay"))
                .json(&body)
                .send()
                .await
                .expect("herald answers");
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let counts: Value = herald
        .http
        .get(format!("{}/api/v1/admin/dlq/counts", herald.address))
        .send()
        .await
        .expect("herald answers")
        .json()
        .await
        .unwrap();
    assert_eq!(counts["total"], LETTERS + 20, "{counts}");
    let prints: Vec<i64> = counts["byFingerprint"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_i64().unwrap())
        .collect();
    assert_eq!(prints, [LETTERS as i64, 10, 10], "three causes: {counts}");
    let (status, dry) = replay(json!({ "dryRun": true })).await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["matched"], LETTERS + 20, "{dry}");
    assert_eq!(dry["requeue"], LETTERS, "{dry}");
    assert_eq!(dry["reingest"], 20, "{dry}");
    assert_eq!(
        dry["reingestStillPoison"],
        json!({ "decode": 10, "unknown_event_type": 10 }),
        "{dry}"
    );
    let (status, started) =
        replay(json!({ "filter": { "failedChannel": "SMS" }, "ratePerSecond": RATE })).await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["total"], LETTERS, "{started}");
    let id: uuid::Uuid = started["id"].as_str().unwrap().parse().unwrap();
    let done = || async {
        sqlx::query_as::<_, (i32, String)>(
            "SELECT requeued + reingested + skipped + failed, status FROM dlq_replays WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&scenario.db)
        .await
        .unwrap_or((0, String::new()))
    };
    assert!(
        wait_until(60, || async { done().await.0 >= LETTERS as i32 / 2 }).await,
        "the replay did not get half way: {:?}",
        done().await
    );
    herald.kill();
    let (at_kill, _) = done().await;
    assert!(
        (at_kill as usize) < LETTERS,
        "the kill came after the replay ended"
    );

    // Restarted (after the dead member's session, as in the scenario above): the replay goes
    // on once the dead instance's lease (30 s) lapses.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let mut restarted = scenario.spawn("a", &[]);
    assert!(
        wait_until(120, || async { done().await.1 == "COMPLETED" }).await,
        "the replay did not complete after the restart: {:?}; see {}",
        done().await,
        restarted.log.display()
    );
    let sms_sent = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM deliveries WHERE channel = 'SMS' AND status = 'SUCCESS'",
        )
        .fetch_one(&scenario.db)
        .await
        .unwrap_or(0)
    };
    assert!(
        wait_until(120, || async { sms_sent().await == LETTERS as i64 }).await,
        "{} of {LETTERS} SMS sent",
        sms_sent().await
    );
    restarted.assert_running();

    let (requeued, skipped, failed, seconds): (i32, i32, i32, f64) = sqlx::query_as(
        "SELECT requeued, skipped, failed, EXTRACT(EPOCH FROM finished_at - created_at)::float8 \
         FROM dlq_replays WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&scenario.db)
    .await
    .unwrap();
    let replay_count_above_one: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dlq_messages WHERE failed_channel = 'SMS' AND replay_count <> 1",
    )
    .fetch_one(&scenario.db)
    .await
    .unwrap();
    let mut per_delivery = std::collections::HashMap::<String, usize>::new();
    for hit in receivers.hits().into_iter().filter(|h| h.channel == "sms") {
        *per_delivery.entry(hit.delivery_id).or_default() += 1;
    }
    let resent = per_delivery.values().map(|n| n - 1).sum::<usize>();
    println!(
        "replay: {LETTERS} letters at {RATE}/s in {seconds:.1} s with a SIGKILL after {at_kill}; \
         requeued {requeued}, skipped {skipped}, failed {failed}; {} SMS delivered, {resent} \
         sent twice (sends in flight at the kill)",
        per_delivery.len()
    );
    assert_eq!((requeued, skipped, failed), (LETTERS as i32, 0, 0));
    assert_eq!(replay_count_above_one, 0, "each letter was replayed once");
    assert_eq!(per_delivery.len(), LETTERS, "every SMS reached the gateway");
    // A send in flight at the kill (its outcome not yet recorded) goes again after its lease:
    // dispatch's at-least-once bound, not the replay's.
    assert!(resent <= CONCURRENCY, "{resent} SMS sent twice");
    assert!(
        seconds >= (LETTERS - 1) as f64 / RATE as f64 * 0.9,
        "{LETTERS} letters in {seconds} s at {RATE}/s"
    );
}
