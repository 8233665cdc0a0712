//! The Kafka consumers against the real broker and database.

use herald::{
    domain::Domain,
    ingest::{IncomingMessage, Ingestor},
};
use serde_json::{Value, json};

use crate::helpers::{TestApp, envelope, spawn_front_half, wait_until};

fn with_slack(settings: &mut herald::config::Settings) {
    settings.channels.slack_webhook_url = Some("http://127.0.0.1:9/ops-webhook".to_owned().into());
}

async fn publish_event(app: &TestApp, topic: &str, event: &Value) {
    let key = event["userId"].to_string();
    app.publish(topic, &key, event.to_string().as_bytes()).await;
}

async fn wait_for_event(app: &TestApp, event_id: &str) {
    wait_until(30, &format!("event {event_id} is stored"), || async {
        !app.deliveries_of_event(event_id).await.is_empty()
    })
    .await;
}

#[tokio::test]
async fn each_routed_event_type_produces_its_listed_deliveries_pending() {
    let app = spawn_front_half(with_slack).await;
    let cases = [
        (
            "fluxpay.payment.events",
            "PAYMENT_COMPLETED",
            vec!["EMAIL", "IN_APP"],
        ),
        (
            "fluxpay.payment.events",
            "PAYMENT_FAILED",
            vec!["EMAIL", "IN_APP", "SLACK"],
        ),
        (
            "fluxpay.subscription.events",
            "SUBSCRIPTION_CREATED",
            vec!["EMAIL", "IN_APP"],
        ),
        (
            "fluxpay.subscription.events",
            "SUBSCRIPTION_RENEWED",
            vec!["EMAIL"],
        ),
        (
            "fluxpay.subscription.events",
            "SUBSCRIPTION_CANCELLED",
            vec!["EMAIL"],
        ),
        (
            "fluxpay.subscription.events",
            "SUBSCRIPTION_EXPIRING",
            vec!["EMAIL", "IN_APP"],
        ),
        ("fluxpay.order.events", "ORDER_COMPLETED", vec!["EMAIL"]),
        (
            "fluxpay.order.events",
            "ORDER_SHIPPED",
            vec!["EMAIL", "IN_APP"],
        ),
        (
            "fluxpay.order.events",
            "ORDER_CANCELLED",
            vec!["EMAIL", "IN_APP"],
        ),
    ];
    let mut events = Vec::new();
    for (i, (topic, event_type, _)) in cases.iter().enumerate() {
        let event = envelope(event_type, 100 + i as i64, json!({ "orderId": "o-1" }));
        publish_event(&app, topic, &event).await;
        events.push(event);
    }

    for ((_, event_type, channels), event) in cases.iter().zip(&events) {
        let id = event["eventId"].as_str().unwrap();
        wait_for_event(&app, id).await;
        let deliveries = app.deliveries_of_event(id).await;
        let mut expected: Vec<&str> = channels.clone();
        expected.sort();
        let got: Vec<&str> = deliveries.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(got, expected, "{event_type}");
        assert!(
            deliveries.iter().all(|d| d.1 == "PENDING"),
            "{event_type}: {deliveries:?}"
        );
    }
    let email = app
        .deliveries_of_event(events[0]["eventId"].as_str().unwrap())
        .await;
    assert_eq!(email[0].2.as_deref(), Some("user100@example.com"));
    // Each delivery announced itself on the outbox for the read model.
    let delivery_events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_messages WHERE kind = 'delivery_event'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(delivery_events, 16);
}

#[tokio::test]
async fn the_same_event_published_twice_yields_one_notification() {
    let app = spawn_front_half(|_| {}).await;
    let event = envelope("ORDER_SHIPPED", 7, json!({ "orderId": "o-7" }));
    let marker = envelope("ORDER_SHIPPED", 7, json!({ "orderId": "o-8" }));

    publish_event(&app, "fluxpay.order.events", &event).await;
    publish_event(&app, "fluxpay.order.events", &event).await;
    publish_event(&app, "fluxpay.order.events", &marker).await;

    // The marker comes after both copies in the same partition (same key).
    wait_for_event(&app, marker["eventId"].as_str().unwrap()).await;
    let copies: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE event_id = $1")
        .bind(event["eventId"].as_str())
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(copies, 1);
    assert_eq!(app.notification_count().await, 2);
}

#[tokio::test]
async fn a_redelivered_batch_creates_nothing_new() {
    // What a consumer sees after a crash between commit and offset store: the same messages
    // again. The ingest step is driven directly with them.
    let app = spawn_front_half(|_| {}).await;
    let ingestor = ingestor_of(&app);
    let event = envelope("PAYMENT_COMPLETED", 11, json!({ "orderId": "o-11" }));
    let message = IncomingMessage {
        topic: "fluxpay.payment.events".to_owned(),
        partition: 0,
        offset: 41,
        key: Some(b"11".to_vec()),
        payload: event.to_string().into_bytes(),
        headers: Vec::new(),
        timestamp: None,
    };

    let first = ingestor
        .process(
            Domain::Payment,
            "notif-payment",
            std::slice::from_ref(&message),
        )
        .await
        .unwrap();
    let again = ingestor
        .process(
            Domain::Payment,
            "notif-payment",
            &[message.clone(), message],
        )
        .await
        .unwrap();

    assert_eq!((first.accepted, first.duplicates), (1, 0));
    assert_eq!((again.accepted, again.duplicates), (0, 2));
    assert_eq!(app.notification_count().await, 1);
    let deliveries: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(deliveries, 2);
}

/// A message of `event` as read from `topic` at `offset`.
fn message_of(topic: &str, offset: i64, event: &Value) -> IncomingMessage {
    IncomingMessage {
        topic: topic.to_owned(),
        partition: 0,
        offset,
        key: Some(event["userId"].to_string().into_bytes()),
        payload: event.to_string().into_bytes(),
        headers: Vec::new(),
        timestamp: None,
    }
}

#[tokio::test]
async fn two_instances_storing_the_same_events_at_once_store_each_once() {
    // Two instances during a rebalance: both read the same messages and store them
    // concurrently. The notifications' unique key makes the later one wait and skip them.
    let app = spawn_front_half(|_| {}).await;
    let (one, two) = (ingestor_of(&app), ingestor_of(&app));
    let messages: Vec<IncomingMessage> = (0..100)
        .map(|i| {
            let event = envelope("PAYMENT_COMPLETED", 30 + i, json!({ "orderId": "o-30" }));
            message_of("fluxpay.payment.events", i, &event)
        })
        .collect();
    let mut reversed = messages.clone();
    reversed.reverse();

    let (a, b) = tokio::join!(
        one.process(Domain::Payment, "notif-payment", &messages),
        two.process(Domain::Payment, "notif-payment", &reversed),
    );
    let (a, b) = (a.unwrap(), b.unwrap());

    assert_eq!(a.accepted + b.accepted, 100, "{a:?} {b:?}");
    assert_eq!(a.duplicates + b.duplicates, 100, "{a:?} {b:?}");
    assert_eq!(app.notification_count().await, 100);
    let deliveries: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(deliveries, 200);
}

#[tokio::test]
async fn an_event_id_is_idempotent_per_topic_as_it_was_per_consumer_group() {
    // The key was (consumer group, eventId); each domain's topic has its own group, so the
    // same eventId on another domain's topic is another event.
    let app = spawn_front_half(|_| {}).await;
    let ingestor = ingestor_of(&app);
    let payment = envelope("PAYMENT_COMPLETED", 12, json!({ "orderId": "o-12" }));
    let mut order = envelope("ORDER_SHIPPED", 12, json!({ "orderId": "o-12" }));
    order["eventId"] = payment["eventId"].clone();

    let first = ingestor
        .process(
            Domain::Payment,
            "notif-payment",
            &[message_of("fluxpay.payment.events", 1, &payment)],
        )
        .await
        .unwrap();
    let other_topic = ingestor
        .process(
            Domain::Order,
            "notif-order",
            &[message_of("fluxpay.order.events", 1, &order)],
        )
        .await
        .unwrap();
    let again = ingestor
        .process(
            Domain::Payment,
            "notif-payment",
            &[message_of("fluxpay.payment.events", 2, &payment)],
        )
        .await
        .unwrap();

    assert_eq!((first.accepted, first.duplicates), (1, 0));
    assert_eq!((other_topic.accepted, other_topic.duplicates), (1, 0));
    assert_eq!((again.accepted, again.duplicates), (0, 1));
    assert_eq!(app.notification_count().await, 2);
}

#[tokio::test]
async fn a_restarted_consumer_resumes_after_its_committed_offset() {
    let first = spawn_front_half(|_| {}).await;
    let before = envelope("ORDER_COMPLETED", 21, json!({ "orderId": "o-21" }));
    publish_event(&first, "fluxpay.order.events", &before).await;
    wait_for_event(&first, before["eventId"].as_str().unwrap()).await;
    let settings = first.settings.clone();
    drop(first);
    // The first instance commits its offsets on the way out.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    let second = crate::helpers::spawn_app_on(
        settings,
        &[herald::roles::Role::Api, herald::roles::Role::Ingest],
    )
    .await;
    let after = envelope("ORDER_COMPLETED", 21, json!({ "orderId": "o-22" }));
    publish_event(&second, "fluxpay.order.events", &after).await;
    wait_for_event(&second, after["eventId"].as_str().unwrap()).await;

    assert_eq!(second.notification_count().await, 2);
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_with_their_class_and_later_events_still_flow() {
    let app = spawn_front_half(|_| {}).await;
    let mut missing_id = envelope("PAYMENT_COMPLETED", 5, json!({}));
    missing_id.as_object_mut().unwrap().remove("eventId");
    let mut negative_user = envelope("PAYMENT_COMPLETED", 5, json!({}));
    negative_user["userId"] = json!(-5);
    let unknown_type = envelope("PAYMENT_REFUNDED_TWICE", 5, json!({}));
    let wrong_domain = envelope("ORDER_SHIPPED", 5, json!({}));
    let good = envelope("PAYMENT_COMPLETED", 5, json!({ "orderId": "o-5" }));
    let messages: Vec<(String, Vec<u8>)> = [
        b"{\"eventId\": \"broken".to_vec(),
        missing_id.to_string().into_bytes(),
        negative_user.to_string().into_bytes(),
        unknown_type.to_string().into_bytes(),
        wrong_domain.to_string().into_bytes(),
        good.to_string().into_bytes(),
    ]
    .into_iter()
    .map(|payload| ("5".to_owned(), payload))
    .collect();

    app.publish_all("fluxpay.payment.events", &messages).await;
    wait_for_event(&app, good["eventId"].as_str().unwrap()).await;

    let letters = app.dead_letters().await;
    let classes: Vec<&str> = letters
        .iter()
        .map(|(_, h, _)| h["X-Error-Class"].as_str().unwrap())
        .collect();
    assert_eq!(
        classes,
        [
            "decode",
            "missing_field",
            "invalid_field",
            "unknown_event_type",
            "unknown_event_type"
        ]
    );
    let dlq_topic = format!(
        "{}notification.dlq.payment",
        app.settings.kafka.topic_prefix
    );
    let topic = format!("{}fluxpay.payment.events", app.settings.kafka.topic_prefix);
    for ((letter_topic, headers, payload), (_, original)) in letters.iter().zip(&messages) {
        assert_eq!(letter_topic, &dlq_topic);
        assert_eq!(
            payload, original,
            "the dead letter carries the original bytes"
        );
        assert_eq!(headers["X-Original-Topic"], topic.as_str());
        assert_eq!(headers["X-Retry-Count"], "0");
        assert_eq!(
            headers["X-Consumer-Group"],
            format!("{}notif-payment", app.settings.kafka.topic_prefix).as_str()
        );
        assert!(!headers["X-Error-Message"].as_str().unwrap().is_empty());
        assert!(
            headers["X-Original-Offset"]
                .as_str()
                .unwrap()
                .parse::<i64>()
                .is_ok()
        );
        for name in [
            "X-Failed-Channel",
            "X-Event-Id",
            "X-Notification-Id",
            "X-Delivery-Id",
            "X-Failed-At",
            "X-Original-Partition",
        ] {
            assert!(headers.get(name).is_some(), "{name} missing from {headers}");
        }
    }
    assert_eq!(letters[2].1["X-Event-Id"], negative_user["eventId"]);
    assert_eq!(app.notification_count().await, 1);
}

#[tokio::test]
async fn opted_out_channels_are_skipped_with_the_reason_but_operator_slack_is_not() {
    let app = spawn_front_half(with_slack).await;
    let put = app
        .put_json(
            "/api/v1/notifications/settings?userId=31",
            &json!({ "channels": { "IN_APP": false }, "eventTypes": { "PAYMENT_FAILED": { "EMAIL": false } } }),
        )
        .await;
    assert_eq!(put.status(), 200);
    let failed = envelope("PAYMENT_FAILED", 31, json!({}));
    let completed = envelope("PAYMENT_COMPLETED", 31, json!({}));

    publish_event(&app, "fluxpay.payment.events", &failed).await;
    publish_event(&app, "fluxpay.payment.events", &completed).await;
    wait_for_event(&app, completed["eventId"].as_str().unwrap()).await;

    let failed = app
        .deliveries_of_event(failed["eventId"].as_str().unwrap())
        .await;
    assert_eq!(failed[0].0, "EMAIL");
    assert_eq!(failed[0].1, "SKIPPED");
    assert_eq!(
        failed[0].3.as_deref(),
        Some("user opted out of EMAIL for PAYMENT_FAILED")
    );
    assert_eq!(failed[1].0, "IN_APP");
    assert_eq!(
        failed[1].3.as_deref(),
        Some("user opted out of IN_APP for PAYMENT_FAILED")
    );
    assert_eq!(
        (failed[2].0.as_str(), failed[2].1.as_str()),
        ("SLACK", "PENDING")
    );
    let completed = app
        .deliveries_of_event(completed["eventId"].as_str().unwrap())
        .await;
    assert_eq!(
        (completed[0].0.as_str(), completed[0].1.as_str()),
        ("EMAIL", "PENDING")
    );
    assert_eq!(
        (completed[1].0.as_str(), completed[1].1.as_str()),
        ("IN_APP", "SKIPPED")
    );
}

#[tokio::test]
async fn the_directory_supplies_missing_addresses_and_the_envelope_overrides_it() {
    let app = spawn_front_half(|_| {}).await;
    let put = app
        .put_json(
            "/api/v1/users/41/contact",
            &json!({ "email": "dir41@example.com", "locale": "en" }),
        )
        .await;
    assert_eq!(put.status(), 200);
    let mut from_directory = envelope("ORDER_COMPLETED", 41, json!({}));
    from_directory.as_object_mut().unwrap().remove("recipient");
    let overridden = envelope("ORDER_COMPLETED", 41, json!({}));
    let mut nobody = envelope("ORDER_COMPLETED", 42, json!({}));
    nobody.as_object_mut().unwrap().remove("recipient");

    for event in [&from_directory, &overridden, &nobody] {
        publish_event(&app, "fluxpay.order.events", event).await;
    }
    for event in [&from_directory, &overridden, &nobody] {
        wait_for_event(&app, event["eventId"].as_str().unwrap()).await;
    }

    let address = |rows: Vec<crate::helpers::DeliveryRow>| rows[0].clone();
    let directory = address(
        app.deliveries_of_event(from_directory["eventId"].as_str().unwrap())
            .await,
    );
    assert_eq!(directory.2.as_deref(), Some("dir41@example.com"));
    let envelope_wins = address(
        app.deliveries_of_event(overridden["eventId"].as_str().unwrap())
            .await,
    );
    assert_eq!(envelope_wins.2.as_deref(), Some("user41@example.com"));
    let missing = address(
        app.deliveries_of_event(nobody["eventId"].as_str().unwrap())
            .await,
    );
    assert_eq!(missing.1, "SKIPPED");
    assert_eq!(
        missing.3.as_deref(),
        Some("no email address for the recipient")
    );
    let locales: Vec<String> = sqlx::query_scalar(
        "SELECT locale FROM notifications WHERE user_id = 41 ORDER BY created_at",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert!(
        locales.contains(&"en".to_owned()) && locales.contains(&"ko".to_owned()),
        "{locales:?}"
    );
}

#[tokio::test]
async fn with_redis_down_events_are_still_ingested_using_postgres_preferences() {
    let app = spawn_front_half(|s| s.redis.url = "redis://127.0.0.1:1".to_owned().into()).await;
    sqlx::query("INSERT INTO user_preferences (user_id, channel, event_type, enabled) VALUES (51, 'IN_APP', '*', false)")
        .execute(&app.db)
        .await
        .unwrap();
    let event = envelope("ORDER_SHIPPED", 51, json!({}));

    publish_event(&app, "fluxpay.order.events", &event).await;
    wait_for_event(&app, event["eventId"].as_str().unwrap()).await;

    let deliveries = app
        .deliveries_of_event(event["eventId"].as_str().unwrap())
        .await;
    assert_eq!(
        (deliveries[1].0.as_str(), deliveries[1].1.as_str()),
        ("IN_APP", "SKIPPED")
    );
    assert!(app.dead_letters().await.is_empty());
}

#[tokio::test]
async fn while_postgres_refuses_connections_the_consumer_pauses_and_dead_letters_nothing() {
    let app = spawn_front_half(|_| {}).await;
    let admin = crate::helpers::admin_connection(&app.settings).await;
    let block = format!(
        r#"ALTER DATABASE "{}" ALLOW_CONNECTIONS false"#,
        app.db_name
    );
    let kick = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
        app.db_name
    );
    let unblock = format!(r#"ALTER DATABASE "{}" ALLOW_CONNECTIONS true"#, app.db_name);
    crate::helpers::execute(&admin, &block).await;
    crate::helpers::execute(&admin, &kick).await;

    let events: Vec<Value> = (0..5)
        .map(|i| {
            envelope(
                "ORDER_COMPLETED",
                61,
                json!({ "orderId": format!("o-{i}") }),
            )
        })
        .collect();
    for event in &events {
        publish_event(&app, "fluxpay.order.events", event).await;
    }
    // Long enough for the consumer to take the batch and fail to store it a few times.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    crate::helpers::execute(&admin, &unblock).await;

    for event in &events {
        wait_for_event(&app, event["eventId"].as_str().unwrap()).await;
    }
    assert_eq!(app.notification_count().await, 5);
    assert!(app.dead_letters().await.is_empty());
}

fn ingestor_of(app: &TestApp) -> Ingestor {
    let settings = &app.settings;
    let routing = herald::routing::RoutingTable::load(&settings.ingest.routing_file).unwrap();
    let schemas = herald::event_schemas::EventSchemas::load(
        &settings.templates.schemas_dir,
        routing.event_types(),
    )
    .unwrap();
    Ingestor {
        db: app.db.clone(),
        redis: app.redis.clone(),
        routing: std::sync::Arc::new(routing),
        schemas: std::sync::Arc::new(schemas),
        channel_enabled: std::sync::Arc::new(herald::intake::channel_enabled(settings)),
        topic_prefix: settings.kafka.topic_prefix.clone(),
        redis_prefix: settings.redis.key_prefix.clone(),
        max_event_bytes: settings.ingest.max_event_bytes,
        wakeup: herald::dispatch::wakeup::Wakeup::new(app.db.clone()),
    }
}

/// An instance that only ingests splits each batch into lanes by key and keeps two batches
/// in flight; each user's events are still stored in the order of their offsets: an event's
/// transaction (its row's xmin) is never older than the one of an event before it.
#[tokio::test]
async fn an_ingest_only_instance_stores_each_users_events_in_the_order_of_their_offsets() {
    let app = spawn_front_half(|_| {}).await;
    let events: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|i| {
            let user = 1 + i % 40;
            let event = envelope("PAYMENT_COMPLETED", user, json!({}));
            (user.to_string(), event.to_string().into_bytes())
        })
        .collect();
    app.publish_backlog("fluxpay.payment.events", &events).await;
    wait_until(60, "every event is stored", || async {
        app.notification_count().await == 3000
    })
    .await;

    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT user_id, source_offset, xmin::text::bigint FROM notifications \
         ORDER BY user_id, source_partition, source_offset",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(rows.len(), 3000);
    for pair in rows.windows(2) {
        let [(user, offset, tx), (next_user, next_offset, next_tx)] = pair else {
            unreachable!()
        };
        if user == next_user {
            assert!(
                tx <= next_tx,
                "user {user}: offset {next_offset} was stored in transaction {next_tx}, before offset {offset} in {tx}"
            );
        }
    }
    // The lanes did split the batches: two transactions hold interleaved offsets of one
    // partition (one transaction a batch would store each partition's offsets in runs).
    let split: bool = sqlx::query_scalar(
        "WITH r AS (SELECT source_partition AS p, xmin::text::bigint AS tx, \
                        min(source_offset) AS lo, max(source_offset) AS hi \
                    FROM notifications GROUP BY 1, 2) \
         SELECT EXISTS (SELECT 1 FROM r a JOIN r b \
                        ON a.p = b.p AND a.tx < b.tx AND a.lo < b.hi AND b.lo < a.hi)",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(
        split,
        "no two transactions interleaved a partition's offsets"
    );
}
