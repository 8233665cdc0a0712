//! Dead letters keep their identity, and no record stops a consumer or the relay: the DLQ
//! store keys on `X-Dead-Letter-Id` rather than topic positions, records PostgreSQL refuses
//! are parked, and the relay parks or truncates what Kafka will never take.

use std::time::Duration;

use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::{Value, json};
use uuid::Uuid;

use herald::{dlq::store, kafka::consumer::IncomingMessage};

use crate::helpers::{TestApp, envelope, read_topic, spawn_app, spawn_app_with, wait_until};

const TOKEN: &str = "test-admin-token-0123456789";

async fn listed(app: &TestApp, query: &str) -> Vec<Value> {
    let page: Value = app
        .http
        .get(format!("{}/api/v1/admin/dlq{query}", app.address))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["items"].as_array().unwrap().clone()
}

/// Publishes one record with headers to a topic (unprefixed name), as another producer
/// would, allowing records up to 2 MB.
async fn publish_record(
    app: &TestApp,
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: &[(&str, &str)],
) {
    let producer: FutureProducer = herald::kafka::client_config(&app.settings.kafka)
        .set("message.timeout.ms", "10000")
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    let mut owned = OwnedHeaders::new();
    for (name, value) in headers {
        owned = owned.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    let topic = format!("{}{topic}", app.settings.kafka.topic_prefix);
    producer
        .send(
            FutureRecord::to(&topic)
                .key(key)
                .payload(payload)
                .headers(owned),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("the test broker takes the record");
}

fn letter(offset: i64, id: Option<Uuid>, payload: &str) -> IncomingMessage {
    let mut headers = vec![
        ("X-Error-Class".to_owned(), "decode".to_owned()),
        ("X-Error-Message".to_owned(), "not JSON".to_owned()),
        (
            "X-Original-Topic".to_owned(),
            "fluxpay.order.events".to_owned(),
        ),
        ("X-Original-Partition".to_owned(), "0".to_owned()),
        ("X-Original-Offset".to_owned(), "0".to_owned()),
    ];
    if let Some(id) = id {
        headers.push(("X-Dead-Letter-Id".to_owned(), id.to_string()));
    }
    IncomingMessage {
        topic: "notification.dlq.order".to_owned(),
        partition: 0,
        offset,
        key: Some(b"1".to_vec()),
        payload: payload.as_bytes().to_vec(),
        headers,
        timestamp: None,
    }
}

async fn stored_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM dlq_messages")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn letters_at_the_same_position_are_kept_apart_by_their_ids_and_a_copy_is_stored_once() {
    let app = spawn_app().await;
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    // Two failures of the same poison bytes, the second after the topic was recreated:
    // same DLQ position, same original position, different letters.
    let before_reset = [letter(0, Some(first), "not json")];
    let after_reset = [letter(0, Some(second), "not json")];

    let stored = store::store(&app.db, "g", "", &before_reset).await.unwrap();
    assert_eq!(stored.stored, 1);
    let stored = store::store(&app.db, "g", "", &after_reset).await.unwrap();
    assert_eq!(stored.stored, 1, "a new letter at an old position is new");
    // The relay published each twice (a crash between producing and marking).
    let copies = [
        letter(7, Some(first), "not json"),
        letter(0, Some(second), "not json"),
    ];
    let stored = store::store(&app.db, "g", "", &copies).await.unwrap();

    assert_eq!(stored.stored, 0);
    assert_eq!(stored.duplicates, 2);
    assert_eq!(stored_rows(&app).await, 2);
    let ids: Vec<Option<Uuid>> =
        sqlx::query_scalar("SELECT dead_letter_id FROM dlq_messages ORDER BY dead_letter_id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(ids, vec![Some(first), Some(second)]);
}

#[tokio::test]
async fn a_letter_from_another_producer_without_an_id_is_stored_once_per_record() {
    let app = spawn_app().await;
    let foreign = letter(3, None, "{\"broken\"");

    store::store(&app.db, "g", "", std::slice::from_ref(&foreign))
        .await
        .unwrap();
    let again = store::store(&app.db, "g", "", std::slice::from_ref(&foreign))
        .await
        .unwrap();
    let other_bytes = letter(3, None, "{\"other\"");
    let other = store::store(&app.db, "g", "", std::slice::from_ref(&other_bytes))
        .await
        .unwrap();

    assert_eq!(again.duplicates, 1, "the same record read again is a copy");
    assert_eq!(
        other.stored, 1,
        "other bytes at the same position are a new letter"
    );
    assert_eq!(stored_rows(&app).await, 2);
    assert_ne!(store::derived_id(&foreign), store::derived_id(&other_bytes));
}

#[tokio::test]
async fn the_same_poison_bytes_published_twice_are_two_dead_letters_each_listed_once_even_when_the_relay_repeats_them()
 {
    let app = spawn_app_with(|s| s.admin.token = Some(TOKEN.to_owned().into())).await;
    let poison = b"{\"this is\": not json".to_vec();
    app.publish("fluxpay.order.events", "5", &poison).await;
    app.publish("fluxpay.order.events", "5", &poison).await;
    wait_until(30, "both dead letters are listed", || async {
        listed(&app, "?domain=order").await.len() == 2
    })
    .await;

    // The relay publishes both again, as after a crash between producing and marking
    // (rows behind where the running relay reads from: found by its next sweep).
    sqlx::query("UPDATE outbox SET published_at = NULL, done = '{}' WHERE kind = 'dead_letter'")
        .execute(&app.db)
        .await
        .unwrap();
    wait_until(30, "the relay published the copies again", || async {
        let copies: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_messages WHERE kind = 'dead_letter' AND NOT published",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        copies == 0
    })
    .await;
    // Same key, same partition: once this third letter is listed, the copies before it
    // have been read.
    app.publish("fluxpay.order.events", "5", b"third").await;
    wait_until(30, "the third dead letter is listed", || async {
        listed(&app, "?domain=order").await.len() >= 3
    })
    .await;

    let letters = listed(&app, "?domain=order").await;
    assert_eq!(letters.len(), 3, "{letters:#?}");
    let mut ids: Vec<&str> = letters
        .iter()
        .map(|l| l["deadLetterId"].as_str().expect("every letter has an id"))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    for letter in &letters {
        assert_eq!(
            letter["headers"]["X-Dead-Letter-Id"],
            letter["deadLetterId"]
        );
        assert!(letter["kafkaOffset"].is_i64());
    }
}

#[tokio::test]
async fn a_dead_letter_the_database_refuses_is_parked_and_the_letters_after_it_are_stored() {
    let app = spawn_app_with(|s| s.admin.token = Some(TOKEN.to_owned().into())).await;
    // Another producer's letter with a NUL in a header: PostgreSQL refuses it in a text
    // column and in JSONB, on every try.
    publish_record(
        &app,
        "notification.dlq.payment",
        "1",
        b"payload",
        &[("X-Error-Message", "bad\0value"), ("X-Error-Class", "x")],
    )
    .await;
    publish_record(
        &app,
        "notification.dlq.payment",
        "1",
        b"fine",
        &[("X-Error-Message", "fine"), ("X-Error-Class", "x")],
    )
    .await;

    wait_until(30, "the letter after the bad one is listed", || async {
        !listed(&app, "?domain=payment").await.is_empty()
    })
    .await;
    let letters = listed(&app, "?domain=payment").await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["payload"], "fine");
    let parked: Vec<(String, Vec<u8>, String)> =
        sqlx::query_as("SELECT consumer_group, payload, reason FROM parked_records")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0].0.ends_with("notif-dlq"), "{}", parked[0].0);
    assert_eq!(parked[0].1, b"payload");
    assert!(parked[0].2.contains("dead letter"), "{}", parked[0].2);
}

#[tokio::test]
async fn a_delivery_event_the_database_refuses_is_parked_and_the_read_model_moves_on() {
    let app = spawn_app().await;
    let event = |event_type: &str| {
        json!({
            "deliveryId": Uuid::new_v4(), "notificationId": Uuid::new_v4(),
            "eventId": null, "eventType": event_type, "userId": 3, "domain": "api",
            "channel": "EMAIL", "status": "SUCCESS", "attempts": 1, "error": null,
            "version": 1, "createdAt": "2026-11-21T09:30:00Z",
            "updatedAt": "2026-11-21T09:30:01Z",
        })
    };
    let bad = event("BAD\u{0}TYPE");
    let good = event("ORDER_SHIPPED");
    let events = [bad.to_string(), good.to_string()]
        .map(|e| ("k".to_owned(), e.into_bytes()))
        .to_vec();
    app.publish_all("notification.delivery.events", &events)
        .await;

    wait_until(30, "the good event reaches the read model", || async {
        let found: Option<String> =
            sqlx::query_scalar("SELECT status FROM notification_log WHERE delivery_id = $1")
                .bind(
                    good["deliveryId"]
                        .as_str()
                        .unwrap()
                        .parse::<Uuid>()
                        .unwrap(),
                )
                .fetch_optional(&app.db)
                .await
                .unwrap();
        found.is_some()
    })
    .await;
    let parked: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT consumer_group, payload FROM parked_records")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(parked.len(), 1);
    assert!(parked[0].0.ends_with("notif-readmodel"), "{}", parked[0].0);
    assert_eq!(parked[0].1, bad.to_string().into_bytes());
}

#[tokio::test]
async fn an_oversized_upstream_event_becomes_a_truncated_dead_letter_and_later_events_still_flow() {
    let app = spawn_app_with(|s| s.admin.token = Some(TOKEN.to_owned().into())).await;
    // About 1 MB: the broker takes it; as a dead letter (the same bytes plus headers) it is
    // over the relay's message.max.bytes (librdkafka's default, 1,000,000).
    let mut huge = envelope("ORDER_SHIPPED", 8, json!({ "orderId": "o-8" }));
    huge["data"]["padding"] = json!("p".repeat(1_000_000));
    let huge = huge.to_string().into_bytes();
    publish_record(&app, "fluxpay.order.events", "8", &huge, &[]).await;
    // Then ordinary traffic: an event for the read model and a small poison message.
    let ordinary = envelope(
        "ORDER_SHIPPED",
        9,
        json!({ "orderId": "o-9", "carrier": "CJ", "trackingNumber": "T-9" }),
    );
    app.publish("fluxpay.order.events", "9", ordinary.to_string().as_bytes())
        .await;
    app.publish("fluxpay.order.events", "9", b"small poison")
        .await;

    let event_id = ordinary["eventId"].as_str().unwrap().to_owned();
    wait_until(30, "the ordinary event reaches the read model", || async {
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notification_log WHERE event_id = $1")
                .bind(&event_id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        rows > 0
    })
    .await;
    wait_until(30, "both dead letters are listed", || async {
        listed(&app, "?domain=order").await.len() == 2
    })
    .await;

    let letters = listed(&app, "?domain=order").await;
    let small = letters
        .iter()
        .find(|l| l["payload"] == "small poison")
        .expect("the small poison message is listed");
    assert!(small["headers"].get("X-Payload-Truncated").is_none());
    let cut = letters
        .iter()
        .find(|l| l["errorClass"] == "oversize")
        .expect("the oversized event is listed");
    assert_eq!(
        cut["headers"]["X-Payload-Truncated"],
        huge.len().to_string(),
        "the header gives the original size"
    );
    let shown = cut["payload"].as_str().unwrap();
    assert_eq!(shown.len(), herald::relay::TRUNCATED_PAYLOAD_BYTES);
    assert!(huge.starts_with(shown.as_bytes()));
    // Retrying it would ingest the cut bytes: refused with the reason.
    let retry = app
        .http
        .post(format!(
            "{}/api/v1/admin/dlq/{}/retry",
            app.address,
            cut["id"].as_str().unwrap()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 409);
}

#[tokio::test]
async fn a_message_kafka_refuses_is_parked_with_its_error_and_the_messages_beside_and_behind_it_are_published()
 {
    let app = spawn_app().await;
    let topic = format!(
        "{}notification.delivery.events",
        app.settings.kafka.topic_prefix
    );
    // A delivery event over the producer's limit: not a dead letter, so it is not cut. It
    // shares its row with a message after it, as one transaction's messages do.
    let oversized = vec![b'x'; 1_200_000];
    let refused_row = app
        .outbox_row(
            "delivery_event",
            &topic,
            &[b"before", &oversized, b"beside"],
        )
        .await;
    let behind = app.outbox_row("delivery_event", &topic, &[b"small"]).await;

    wait_until(15, "both rows are published", || async {
        let published: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE id = ANY($1) AND published_at IS NOT NULL",
        )
        .bind([refused_row, behind])
        .fetch_one(&app.db)
        .await
        .unwrap();
        published == 2
    })
    .await;
    let parked: Vec<(i64, i32, String, i32)> =
        sqlx::query_as("SELECT id, position, error, length(payload) FROM outbox_parked")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!((parked[0].0, parked[0].1), (refused_row, 2));
    assert!(parked[0].2.contains("too large"), "{}", parked[0].2);
    assert_eq!(parked[0].3, 1_200_000, "kept whole for the operator");
    // Read until a fourth record shows up, which it must not.
    let mut on_topic: Vec<Vec<u8>> =
        read_topic(&app.settings, "notification.delivery.events", 5, |r| {
            r.len() > 3
        })
        .await
        .into_iter()
        .map(|m| m.payload)
        .collect();
    // Without keys they spread over the partitions: compare without their order.
    on_topic.sort();
    assert_eq!(
        on_topic,
        [b"before".to_vec(), b"beside".to_vec(), b"small".to_vec()],
        "the others are published once each"
    );
}

#[tokio::test]
async fn a_row_published_in_part_keeps_what_was_settled_and_publishes_only_the_rest() {
    let app = spawn_app().await;
    let topic = format!("{}notification.dlq.order", app.settings.kafka.topic_prefix);
    // The second dead letter is too large: it is cut and published in a later batch,
    // after the first one was published and recorded as done.
    let huge = vec![b'y'; 1_200_000];
    let row = app
        .outbox_row("dead_letter", &topic, &[b"first", &huge])
        .await;
    wait_until(15, "the row is published", || async {
        let published: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT published_at FROM outbox WHERE id = $1")
                .bind(row)
                .fetch_one(&app.db)
                .await
                .unwrap();
        published.is_some()
    })
    .await;
    let done: Vec<i32> = sqlx::query_scalar("SELECT done FROM outbox WHERE id = $1")
        .bind(row)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(done, [1], "the first message was settled on its own");
    let records = read_topic(&app.settings, "notification.dlq.order", 5, |r| r.len() > 2).await;
    assert_eq!(records.len(), 2, "each published once");
    assert_eq!(records[0].payload, b"first");
    assert_eq!(
        records[1]
            .headers
            .get("X-Payload-Truncated")
            .map(String::as_str),
        Some("1200000")
    );
    assert_eq!(
        records[1].payload.len(),
        herald::relay::TRUNCATED_PAYLOAD_BYTES
    );
}

#[tokio::test]
async fn a_row_for_a_missing_topic_waits_on_its_own_while_the_rows_after_it_flow() {
    let app = spawn_app().await;
    let missing = format!("{}no.such.topic", app.settings.kafka.topic_prefix);
    let delivery_topic = format!(
        "{}notification.delivery.events",
        app.settings.kafka.topic_prefix
    );
    let stuck = app
        .outbox_row("delivery_event", &missing, &[b"lost?"])
        .await;
    // Give the relay time to meet the missing topic and hold it.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let started = std::time::Instant::now();
    let mut published = Vec::new();
    for _ in 0..5 {
        let id = app
            .outbox_row("delivery_event", &delivery_topic, &[b"x"])
            .await;
        published.push(id);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_until(10, "every row after the stuck one is published", || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE id = ANY($1) AND published_at IS NULL",
        )
        .bind(&published)
        .fetch_one(&app.db)
        .await
        .unwrap();
        left == 0
    })
    .await;
    let took = started.elapsed();

    let stuck_row: (Option<chrono::DateTime<chrono::Utc>>,) =
        sqlx::query_as("SELECT published_at FROM outbox WHERE id = $1")
            .bind(stuck)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        stuck_row.0, None,
        "the row waits for its topic, it is not lost"
    );
    assert!(
        took < Duration::from_secs(4),
        "rows behind a missing topic took {took:?}"
    );
}
