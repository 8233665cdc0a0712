//! Hostile input to the real binary: garbage on the upstream topic between good events, and
//! hostile HTTP bodies. The decoder's property tests (src/ingest/decode.rs) and the
//! in-process hostile tests (tests/api/hostile.rs) cover the same ground case by case;
//! this scenario checks the whole pipeline at volume.

use std::collections::BTreeMap;

use serde_json::json;

use crate::harness::{Receivers, Scenario, order_event, order_events};

const GOOD: usize = 500;
const EACH: usize = 20;

/// Messages no consumer may choke on, one of each kind.
fn hostile_messages(tag: &str) -> Vec<Vec<u8>> {
    let mut huge_number: serde_json::Value =
        serde_json::from_slice(&order_event("ORDER_SHIPPED", 3, tag).bytes).unwrap();
    huge_number["userId"] = json!(1e300);
    let mut unknown: serde_json::Value =
        serde_json::from_slice(&order_event("ORDER_SHIPPED", 3, tag).bytes).unwrap();
    unknown["eventType"] = json!("ORDER_TELEPORTED");
    let mut nul: serde_json::Value =
        serde_json::from_slice(&order_event("ORDER_SHIPPED", 3, tag).bytes).unwrap();
    nul["data"]["carrier"] = json!("\u{0}");
    vec![
        vec![0xc3, 0x28, 0xa0, 0xa1],
        vec![b'{'; 70 * 1024],
        format!("{}1{}", "[".repeat(20_000), "]".repeat(20_000)).into_bytes(),
        huge_number.to_string().into_bytes(),
        br#"{"eventId": {"$gt": ""}, "eventType": 1, "userId": [], "occurredAt": null}"#.to_vec(),
        unknown.to_string().into_bytes(),
        nul.to_string().into_bytes(),
        Vec::new(),
    ]
}

/// HTTP bodies the intake must refuse with a 4xx.
fn hostile_bodies() -> Vec<Vec<u8>> {
    vec![
        vec![0xff, 0xfe, 0xfd],
        format!(
            r#"{{"userId": 1, "subject": "s", "body": "{}", "channels": ["SMS"]}}"#,
            "x".repeat(1024 * 1024)
        )
        .into_bytes(),
        format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
        format!(r#"{{"userId": {}}}"#, "9".repeat(400)).into_bytes(),
        br#"{"userId": "1", "eventType": ["ORDER_SHIPPED"]}"#.to_vec(),
        br#"null"#.to_vec(),
        Vec::new(),
    ]
}

#[tokio::test]
async fn hostile_messages_between_good_events_are_dead_lettered_and_their_neighbours_delivered() {
    let receivers = Receivers::start().await;
    let scenario = Scenario::start("hostile", &receivers.settings("a")).await;
    let good = order_events("ORDER_SHIPPED", GOOD, 50, scenario.tag());
    let kinds = hostile_messages(scenario.tag());
    // Each hostile message goes just before a good one with the same key (partition).
    let mut messages = Vec::new();
    let mut hostile = 0;
    for (i, event) in good.iter().enumerate() {
        if i < kinds.len() * EACH {
            messages.push((event.key.clone(), kinds[i % kinds.len()].clone()));
            hostile += 1;
        }
        messages.push((event.key.clone(), event.bytes.clone()));
    }
    let mut herald = scenario.spawn("a", &[]);
    herald.wait_status("/health/live", 200, 30).await;

    // A connection per body: Herald closes the one it refused an oversized body on, and a
    // pooled connection would carry that close into the next request.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client");
    let bodies = hostile_bodies();
    let mut refused = 0;
    let mut cut_off = 0;
    for (i, body) in bodies.iter().enumerate() {
        let answer = client
            .post(format!("{}/api/v1/notifications", herald.address))
            // With a credential: a hostile body must be refused for what it is, not for
            // coming without one.
            .bearer_auth(crate::harness::ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match answer {
            Ok(response) => {
                let status = response.status();
                assert!(status.is_client_error(), "hostile body {i} got {status}");
                assert!(
                    status != 401 && status != 403,
                    "hostile body {i} refused for its credential, not its content"
                );
                refused += 1;
            }
            // Past the body limit Herald answers 413 and closes the connection without
            // reading the rest, so a client still sending may see the close instead.
            Err(error) if body.len() > 256 * 1024 => {
                assert!(error.is_request(), "hostile body {i}: {error:?}");
                cut_off += 1;
            }
            Err(error) => panic!("herald did not answer hostile body {i}: {error:?}"),
        }
    }
    herald.assert_running();
    scenario
        .publish_raw("fluxpay.order.events", &messages)
        .await;

    let tally = scenario.wait_settled(2 * GOOD as i64, 120).await;
    herald.assert_running();
    let classes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT error_class, count(*) FROM dlq_messages GROUP BY error_class ORDER BY 1",
    )
    .fetch_all(&scenario.db)
    .await
    .expect("the DLQ store can be read");
    let classes: BTreeMap<String, i64> = classes.into_iter().collect();
    let audit = scenario.audit(&good, &receivers.receipts()).await;
    scenario.report(
        &audit,
        Some(0),
        &format!(
            "hostile messages {hostile}, dead letters {} {classes:?}, hostile HTTP bodies {}: \
             4xx {refused}, connection closed on an oversized body {cut_off}",
            tally.dlq_messages,
            bodies.len()
        ),
    );
    audit.assert_kept(scenario.name, GOOD, 2 * GOOD);
    assert_eq!(
        tally.dlq_messages, hostile as i64,
        "one dead letter per hostile message"
    );
    assert_eq!(audit.duplicate_sends, 0, "{audit:?}");
}
