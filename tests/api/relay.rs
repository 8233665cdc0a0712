//! The outbox relay against the broker.

use std::time::Duration;

use crate::helpers::{spawn_app, wait_until};

#[tokio::test]
async fn an_outbox_row_that_commits_after_rows_behind_it_were_published_is_still_published() {
    let app = spawn_app().await;
    let topic = format!(
        "{}notification.delivery.events",
        app.settings.kafka.topic_prefix
    );
    let published = |id: i64| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT published_at IS NOT NULL FROM outbox WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&db)
            .await
            .unwrap()
            .unwrap_or(false)
        }
    };
    // A transaction takes its row's id now and commits seconds later, as a slow one would.
    let mut late = app.db.begin().await.unwrap();
    let late_id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (kind, topic, message_keys, payloads, headers) \
         VALUES ('delivery_event', $1, ARRAY[NULL]::bytea[], ARRAY['late'::bytea], '[{}]') \
         RETURNING id",
    )
    .bind(&topic)
    .fetch_one(&mut *late)
    .await
    .unwrap();
    // Rows after it are published, and a second after each batch the relay reads from
    // past them (`relay::Floor`).
    for _ in 0..3 {
        let id = app.outbox_row("delivery_event", &topic, &[b"after"]).await;
        assert!(id > late_id);
        wait_until(10, "a later row is published", || published(id)).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }

    late.commit().await.unwrap();
    wait_until(15, "the late row is published", || published(late_id)).await;
}

#[tokio::test]
async fn a_transactions_messages_are_written_one_row_per_kind_and_topic_each_in_its_order() {
    use std::collections::BTreeMap;

    use herald::outbox::{OutboxKind, OutboxMessage};

    let app = spawn_app().await;
    let prefix = &app.settings.kafka.topic_prefix;
    let deliveries = format!("{prefix}notification.delivery.events");
    let statuses = format!("{prefix}notification.status.events");
    let letters = format!("{prefix}notification.dlq.payment");
    let message =
        |kind, topic: &str, key: Option<&str>, payload: &str, header: Option<&str>| OutboxMessage {
            kind,
            topic: topic.to_owned(),
            key: key.map(|k| k.as_bytes().to_vec()),
            payload: payload.as_bytes().to_vec(),
            headers: header
                .map(|h| BTreeMap::from([("X-Test".to_owned(), h.to_owned())]))
                .unwrap_or_default(),
        };
    // Interleaved as a record's transaction writes them: each delivery's event, then its
    // notification's status, with a dead letter between.
    let messages = [
        message(
            OutboxKind::DeliveryEvent,
            &deliveries,
            Some("n-1"),
            "d-1",
            None,
        ),
        message(
            OutboxKind::StatusEvent,
            &statuses,
            Some("n-1"),
            "s-1",
            Some("h-s-1"),
        ),
        message(
            OutboxKind::DeliveryEvent,
            &deliveries,
            None,
            "d-2",
            Some("h-d-2"),
        ),
        message(
            OutboxKind::DeadLetter,
            &letters,
            Some("k"),
            "l-1",
            Some("h-l-1"),
        ),
        message(OutboxKind::StatusEvent, &statuses, Some("n-2"), "s-2", None),
        message(
            OutboxKind::DeliveryEvent,
            &deliveries,
            Some("n-3"),
            "d-3",
            None,
        ),
    ];
    let mut tx = app.db.begin().await.unwrap();
    herald::outbox::insert(&mut tx, &messages).await.unwrap();
    tx.commit().await.unwrap();

    let rows: Vec<(i64, String, String, i32)> =
        sqlx::query_as("SELECT id, kind, topic, messages FROM outbox ORDER BY id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    let shape: Vec<(&str, &str, i32)> = rows
        .iter()
        .map(|(_, kind, topic, n)| (kind.as_str(), topic.as_str(), *n))
        .collect();
    assert_eq!(
        shape,
        [
            ("delivery_event", deliveries.as_str(), 3),
            ("status_event", statuses.as_str(), 2),
            ("dead_letter", letters.as_str(), 1),
        ],
        "one row per kind and topic, in the order each first appears"
    );
    let lines: Vec<(Option<Vec<u8>>, Vec<u8>, serde_json::Value)> = sqlx::query_as(
        "SELECT message_key, payload, headers FROM outbox_messages ORDER BY id, position",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let lines: Vec<(Option<String>, String, serde_json::Value)> = lines
        .into_iter()
        .map(|(key, payload, headers)| {
            (
                key.map(|k| String::from_utf8(k).unwrap()),
                String::from_utf8(payload).unwrap(),
                headers,
            )
        })
        .collect();
    let line = |key: Option<&str>, payload: &str, headers: serde_json::Value| {
        (key.map(str::to_owned), payload.to_owned(), headers)
    };
    let none = serde_json::json!({});
    assert_eq!(
        lines,
        [
            line(Some("n-1"), "d-1", none.clone()),
            line(None, "d-2", serde_json::json!({ "X-Test": "h-d-2" })),
            line(Some("n-3"), "d-3", none.clone()),
            line(Some("n-1"), "s-1", serde_json::json!({ "X-Test": "h-s-1" })),
            line(Some("n-2"), "s-2", none.clone()),
            line(Some("k"), "l-1", serde_json::json!({ "X-Test": "h-l-1" })),
        ],
        "each message keeps its key and headers, in its topic's order"
    );
}
