//! `POST /api/v1/notifications` and `GET /api/v1/notifications/{id}`.

use serde_json::{Value, json};

use crate::helpers::spawn_front_half;

fn order_shipped(user: i64) -> Value {
    json!({
        "userId": user,
        "recipient": { "email": "buyer@example.com", "locale": "ko" },
        "eventType": "ORDER_SHIPPED",
        "data": { "orderId": "o-77", "carrier": "CJ" }
    })
}

#[tokio::test]
async fn a_valid_request_is_accepted_with_its_deliveries_and_can_be_read_back() {
    let app = spawn_front_half(|_| {}).await;

    let response = app
        .post_json("/api/v1/notifications", &order_shipped(70), &[])
        .await;

    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let id = body["notificationId"].as_str().unwrap();
    assert_eq!(location, format!("/api/v1/notifications/{id}"));
    assert_eq!(body["status"], "PENDING");
    let channels: Vec<&str> = body["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["EMAIL", "IN_APP"]);

    let read: Value = app.get(&location).await.json().await.unwrap();
    assert_eq!(read["id"], id);
    assert_eq!(read["source"], "api");
    assert_eq!(read["status"], "PENDING");
    assert_eq!(read["deliveries"][0]["address"], "buyer@example.com");
    assert_eq!(read["deliveries"][0]["status"], "PENDING");
    assert_eq!(read["data"]["carrier"], "CJ");
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_messages WHERE kind = 'delivery_event'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        events, 2,
        "the intake writes the same rows as the consumers"
    );
}

#[tokio::test]
async fn ad_hoc_subject_and_body_go_to_the_named_channels_and_scheduled_ones_wait() {
    let app = spawn_front_half(|_| {}).await;
    let at = (chrono::Utc::now() + chrono::Duration::hours(2)).to_rfc3339();
    let request = json!({
        "recipient": { "email": "ops@example.com" },
        "channels": ["EMAIL", "SMS"],
        "subject": "Maintenance tonight",
        "body": "Down from 2 to 3 am.",
        "scheduledAt": at,
    });

    let response = app.post_json("/api/v1/notifications", &request, &[]).await;

    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["deliveries"][0]["status"], "PENDING");
    assert_eq!(body["deliveries"][1]["status"], "SKIPPED");
    assert_eq!(
        body["deliveries"][1]["skipReason"],
        "channel SMS is not configured on this Herald"
    );
    let due: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT next_attempt_at FROM deliveries WHERE channel = 'EMAIL'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(due > chrono::Utc::now() + chrono::Duration::minutes(119));
}

#[tokio::test]
async fn the_same_idempotency_key_and_body_replays_the_first_answer() {
    let app = spawn_front_half(|_| {}).await;
    let key = [("Idempotency-Key", "order-77-shipped")];

    let first = app
        .post_json("/api/v1/notifications", &order_shipped(71), &key)
        .await;
    let first_body: Value = first.json().await.unwrap();
    // The same JSON with its keys in another order is the same request.
    let reordered: Value = serde_json::from_str(
        r#"{"data":{"carrier":"CJ","orderId":"o-77"},"eventType":"ORDER_SHIPPED",
            "recipient":{"locale":"ko","email":"buyer@example.com"},"userId":71}"#,
    )
    .unwrap();
    let second = app
        .post_json("/api/v1/notifications", &reordered, &key)
        .await;

    assert_eq!(second.status(), 202);
    assert_eq!(second.headers()["idempotency-replayed"], "true");
    let second_body: Value = second.json().await.unwrap();
    assert_eq!(second_body, first_body);
    assert_eq!(app.notification_count().await, 1);
}

#[tokio::test]
async fn the_same_idempotency_key_with_another_body_is_422() {
    let app = spawn_front_half(|_| {}).await;
    let key = [("Idempotency-Key", "k-1")];
    assert_eq!(
        app.post_json("/api/v1/notifications", &order_shipped(72), &key)
            .await
            .status(),
        202
    );

    let response = app
        .post_json("/api/v1/notifications", &order_shipped(73), &key)
        .await;

    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    assert_eq!(app.notification_count().await, 1);
}

#[tokio::test]
async fn bad_requests_get_400_with_the_error_body_and_store_nothing() {
    let app = spawn_front_half(|_| {}).await;
    let cases = [
        (
            json!({ "userId": 1, "eventType": "ORDER_SHIPPED", "data": {}, "extra": 1 }),
            "extra",
        ),
        (
            json!({ "userId": -1, "eventType": "ORDER_SHIPPED" }),
            "positive",
        ),
        (json!({ "userId": 1 }), "eventType"),
        (
            json!({ "userId": 1, "eventType": "NO_SUCH_EVENT" }),
            "no route",
        ),
        (
            json!({ "userId": 1, "eventType": "ORDER_SHIPPED", "subject": "x" }),
            "not both",
        ),
        (
            json!({ "userId": 1, "subject": "x", "body": "y" }),
            "channels are required",
        ),
        (
            json!({ "userId": 1, "eventType": "ORDER_SHIPPED", "channels": ["FAX"] }),
            "unknown channel",
        ),
        (
            json!({ "userId": 1, "eventType": "ORDER_SHIPPED", "channels": [] }),
            "at least one",
        ),
        (
            json!({ "recipient": { "email": "nope" }, "eventType": "ORDER_SHIPPED" }),
            "recipient.email",
        ),
        (
            json!({ "eventType": "ORDER_SHIPPED" }),
            "userId or recipient",
        ),
        (
            json!({ "userId": 1, "eventType": "ORDER_SHIPPED", "scheduledAt": "2001-01-01T00:00:00Z" }),
            "past",
        ),
        (
            json!({ "userId": 1, "eventType": "ORDER_SHIPPED", "data": [1] }),
            "invalid",
        ),
        (json!("just a string"), "invalid"),
        (
            json!({ "userId": 1, "eventType": "ORDER_SHIPPED", "data": { "note": "a\u{0}b" } }),
            "NUL",
        ),
    ];
    for (request, hint) in cases {
        let response = app.post_json("/api/v1/notifications", &request, &[]).await;
        assert_eq!(response.status(), 400, "{request}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_request", "{request}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(hint), "{request}: {message}");
    }
    let malformed = app
        .http
        .post(format!("{}/api/v1/notifications", app.address))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let too_big = app
        .http
        .post(format!("{}/api/v1/notifications", app.address))
        .header("content-type", "application/json")
        .body(vec![b' '; 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), 413);
    let body: Value = too_big.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert_eq!(app.notification_count().await, 0);
}

#[tokio::test]
async fn reading_an_unknown_or_malformed_id_gives_404_or_400() {
    let app = spawn_front_half(|_| {}).await;

    let missing = app
        .get(&format!("/api/v1/notifications/{}", uuid::Uuid::new_v4()))
        .await;
    let malformed = app.get("/api/v1/notifications/not-a-uuid").await;

    assert_eq!(missing.status(), 404);
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
}

/// Sends a request per user at once and returns (user, status, body) for each.
async fn post_all(app: &crate::helpers::TestApp, users: &[i64]) -> Vec<(i64, u16, Value)> {
    post_all_keyed(app, users, |_| None).await
}

/// [`post_all`] with the Idempotency-Key `key` gives each user's request.
async fn post_all_keyed(
    app: &crate::helpers::TestApp,
    users: &[i64],
    key: impl Fn(i64) -> Option<String>,
) -> Vec<(i64, u16, Value)> {
    futures_util::future::join_all(users.iter().map(|&user| {
        let key = key(user);
        async move {
            let header: Vec<(&str, &str)> = key
                .iter()
                .map(|k| ("Idempotency-Key", k.as_str()))
                .collect();
            let response = app
                .post_json("/api/v1/notifications", &order_shipped(user), &header)
                .await;
            let status = response.status().as_u16();
            (user, status, response.json::<Value>().await.unwrap())
        }
    }))
    .await
}

/// Locks the outbox so that the intake's writers wait on it and requests queue up behind
/// them, until the returned transaction ends.
async fn hold_the_outbox(
    app: &crate::helpers::TestApp,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE outbox IN EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// Ends the transaction holding the outbox after `seconds`.
async fn release_after(holder: sqlx::Transaction<'static, sqlx::Postgres>, seconds: u64) {
    tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
    holder.commit().await.unwrap();
}

/// How many notifications are stored, and by how many transactions.
async fn stored_and_transactions(app: &crate::helpers::TestApp) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT xmin::text) FROM notifications")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_requests_share_transactions() {
    let app = spawn_front_half(|_| {}).await;
    // Hold the outbox so that the writers' first transactions wait and the rest queue up.
    let holder = hold_the_outbox(&app).await;
    let users: Vec<i64> = (101..=140).collect();
    let release = release_after(holder, 2);
    let (answers, ()) = tokio::join!(post_all(&app, &users), release);

    for (user, status, body) in &answers {
        assert_eq!(*status, 202, "user {user}: {body}");
        let read: Value = app
            .get(&format!(
                "/api/v1/notifications/{}",
                body["notificationId"].as_str().unwrap()
            ))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            read["userId"], *user,
            "each request is answered with its own notification"
        );
    }
    let (stored, transactions) = stored_and_transactions(&app).await;
    assert_eq!(stored, 40);
    // 4 writers hold one request each while the outbox is locked; what queued meanwhile is
    // taken in batches once they commit (about 6 transactions when the machine is quiet).
    assert!(
        transactions <= 20,
        "40 requests queued behind a held outbox took {transactions} transactions"
    );
}

#[tokio::test]
async fn concurrent_requests_with_idempotency_keys_share_transactions_and_keep_their_keys() {
    let app = spawn_front_half(|_| {}).await;
    let holder = hold_the_outbox(&app).await;
    let users: Vec<i64> = (101..=140).collect();
    let release = release_after(holder, 2);
    // Keys that sort in the opposite order to the users, so that a writer pairing a key
    // with another request's answer after sorting the keys would show.
    let key = |user: i64| Some(format!("order-{}", 1000 - user));
    let (answers, ()) = tokio::join!(post_all_keyed(&app, &users, key), release);

    for (user, status, _) in &answers {
        assert_eq!(*status, 202, "user {user}");
    }
    let (stored, transactions) = stored_and_transactions(&app).await;
    assert_eq!(stored, 40);
    assert!(
        transactions <= 20,
        "40 keyed requests queued behind a held outbox took {transactions} transactions"
    );
    // Every key's stored answer names its own request's notification.
    let (keys, matching): (i64, i64) = sqlx::query_as(
        "SELECT count(*), \
                count(*) FILTER (WHERE k.idempotency_key = 'order-' || (1000 - n.user_id)) \
         FROM idempotency_keys k \
         LEFT JOIN notifications n ON n.id = (k.response_body->>'notificationId')::uuid",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((keys, matching), (40, 40));
    let (user, _, first) = &answers[17];
    let again = app
        .post_json(
            "/api/v1/notifications",
            &order_shipped(*user),
            &[("Idempotency-Key", &format!("order-{}", 1000 - user))],
        )
        .await;
    assert_eq!(again.headers()["idempotency-replayed"], "true");
    assert_eq!(&again.json::<Value>().await.unwrap(), first);
    assert_eq!(app.notification_count().await, 40);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_store_one_notification_and_all_get_its_answer() {
    let app = spawn_front_half(|_| {}).await;
    let holder = hold_the_outbox(&app).await;
    let key = [("Idempotency-Key", "order-71-shipped")];
    let send = |user: i64| {
        let (app, key) = (&app, &key);
        async move {
            let response = app
                .post_json("/api/v1/notifications", &order_shipped(user), key)
                .await;
            let replayed = response.headers().contains_key("idempotency-replayed");
            let status = response.status().as_u16();
            (status, replayed, response.json::<Value>().await.unwrap())
        }
    };
    // Twelve copies of one request, queued behind the held outbox and spread over the
    // writers' transactions and batches: they collide on the key both in the database and
    // within a batch.
    let release = release_after(holder, 2);
    let (copies, ()) = tokio::join!(
        futures_util::future::join_all((0..12).map(|_| send(71))),
        release
    );

    let stored: Vec<(uuid::Uuid, i64)> = sqlx::query_as("SELECT id, user_id FROM notifications")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "one notification for one key: {stored:?}");
    let (id, user) = stored[0];
    assert_eq!(user, 71);
    for (status, _, body) in &copies {
        assert_eq!(*status, 202, "{body}");
        assert_eq!(body["notificationId"], id.to_string(), "{body}");
    }
    let replayed = copies.iter().filter(|(_, replayed, _)| *replayed).count();
    assert_eq!(
        replayed, 11,
        "one copy stored, the other eleven replay its answer"
    );
    // The key now belongs to that request: another body is refused.
    let (status, _, body) = send(72).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_key_reused", "{body}");
    assert_eq!(app.notification_count().await, 1);
}

#[tokio::test]
async fn a_batch_holding_a_copy_of_a_stored_key_stores_the_rest_and_the_copy_replays() {
    let app = spawn_front_half(|_| {}).await;
    send_a_copy_among_twenty_new(&app).await;
    let (stored, transactions) = stored_and_transactions(&app).await;
    assert_eq!(stored, 21);
    assert!(
        transactions <= 12,
        "21 keyed requests took {transactions} transactions"
    );
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(keys, 21);
}

/// Stores user 150's keyed request, then sends a copy of it (its key held back, see
/// [`key_held_back`]) among twenty new keyed requests queued behind a held outbox, so that
/// the copy lands in a batch with them and its key is taken inside their statement. Checks
/// that the copy is answered as the first request was, and the others stored.
async fn send_a_copy_among_twenty_new(app: &crate::helpers::TestApp) {
    let first = app
        .post_json(
            "/api/v1/notifications",
            &order_shipped(150),
            &[("Idempotency-Key", "order-150")],
        )
        .await;
    assert_eq!(first.status().as_u16(), 202);
    let first: Value = first.json().await.unwrap();
    let key_holder = key_held_back(app).await;
    let holder = hold_the_outbox(app).await;
    let users: Vec<i64> = (150..=170).collect();
    let release = async {
        release_after(holder, 2).await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        key_holder.commit().await.unwrap();
    };
    let key = |user: i64| Some(format!("order-{user}"));
    let (answers, ()) = tokio::join!(post_all_keyed(app, &users, key), release);

    for (user, status, body) in &answers {
        assert_eq!(*status, 202, "user {user}: {body}");
        if *user == 150 {
            assert_eq!(body, &first, "the copy is answered as the first was");
        } else {
            assert_ne!(body["notificationId"], first["notificationId"]);
        }
    }
    assert_eq!(app.notification_count().await, 21);
}

/// Puts the key of user 150's stored request back in a transaction left open, so that a copy
/// sent meanwhile misses it when it looks for a stored answer and reaches a writer, whose
/// statement then waits for the key; commit the returned transaction to let it go on.
async fn key_held_back(
    app: &crate::helpers::TestApp,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let row: Value = sqlx::query_scalar("DELETE FROM idempotency_keys k RETURNING to_jsonb(k)")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let mut key_holder = app.db.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys \
         SELECT * FROM jsonb_populate_record(NULL::idempotency_keys, $1)",
    )
    .bind(&row)
    .execute(&mut *key_holder)
    .await
    .unwrap();
    key_holder
}

#[tokio::test]
async fn a_digest_batch_holding_a_copy_of_a_stored_key_is_written_again_without_it() {
    // ORDER_SHIPPED joins a digest: a batch of them is a transaction (the join, then the
    // store), and the copy's join is not its to keep.
    let manifest = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let routing = std::fs::read_to_string(manifest.join("config/routing.toml")).unwrap();
    let anchor = "event_type = \"ORDER_SHIPPED\"\n";
    assert!(routing.contains(anchor));
    let routing = routing.replacen(
        anchor,
        &format!("{anchor}digest = {{ window_minutes = 10 }}\n"),
        1,
    );
    let path = std::env::temp_dir().join(format!("herald-routing-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&path, routing).unwrap();
    let app = spawn_front_half(move |s| s.ingest.routing_file = path).await;
    send_a_copy_among_twenty_new(&app).await;
    // Every stored request's deliveries are in its user's digest, and the copy's join was
    // rolled back: user 150's digest is as its first request left it.
    let (digests, members, rejoined): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM digests), \
                (SELECT count(DISTINCT notification_id) FROM deliveries WHERE digest_id IS NOT NULL), \
                (SELECT count(*) FROM digests WHERE user_id = 150 AND last_joined_at IS NOT NULL)",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((digests, members, rejoined), (21, 21, 0));
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(keys, 21);
}

#[tokio::test]
async fn a_request_postgres_refuses_fails_alone_and_the_others_of_its_batch_are_stored() {
    let app = spawn_front_half(|_| {}).await;
    sqlx::query("ALTER TABLE notifications ADD CONSTRAINT refuse_666 CHECK (user_id <> 666)")
        .execute(&app.db)
        .await
        .unwrap();
    let holder = hold_the_outbox(&app).await;
    let users: Vec<i64> = (1..=40)
        .map(|n| if n == 20 { 666 } else { 100 + n })
        .collect();
    let release = release_after(holder, 1);
    let (answers, ()) = tokio::join!(post_all(&app, &users), release);

    for (user, status, body) in &answers {
        if *user == 666 {
            assert_eq!(*status, 500, "{body}");
            assert_eq!(body["error"]["code"], "internal", "{body}");
        } else {
            assert_eq!(*status, 202, "user {user}: {body}");
        }
    }
    let (stored, refused): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE user_id = 666) FROM notifications")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!((stored, refused), (39, 0));
}

#[tokio::test]
async fn a_request_abandoned_while_it_waited_for_a_writer_is_not_stored() {
    let app =
        spawn_front_half(|s| s.http.request_timeout = std::time::Duration::from_secs(1)).await;
    let holder = hold_the_outbox(&app).await;
    // Four requests, each sent once the one before is seen waiting on the held outbox, so
    // that each occupies one of the four writers.
    let mut busy = tokio::task::JoinSet::new();
    for n in 1..=4_i64 {
        let (http, url) = (
            app.http.clone(),
            format!("{}/api/v1/notifications", app.address),
        );
        busy.spawn(async move {
            let response = http.post(url).json(&order_shipped(200 + n)).send().await;
            response.unwrap().status().as_u16()
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // A writer's one statement, seen by its start: pg_stat_activity keeps only the
            // first 1,024 bytes of a query, and the outbox's part comes later.
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock' \
                   AND query LIKE '%INSERT INTO notifications%'",
            )
            .fetch_one(&app.db)
            .await
            .unwrap();
            if waiting == n {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{waiting} writers waiting, not {n}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    // The fifth waits in the queue until the API's timeout answers it.
    let abandoned = app
        .post_json("/api/v1/notifications", &order_shipped(299), &[])
        .await
        .status()
        .as_u16();
    holder.commit().await.unwrap();
    assert_eq!(
        abandoned, 503,
        "the API's timeout answers the waiting request"
    );
    // The four being written when their timeout came are committed anyway, as a request
    // whose commit was under way always could be.
    while let Some(status) = busy.join_next().await {
        let status = status.unwrap();
        assert!([202, 503].contains(&status), "{status}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let stored: Vec<i64> = sqlx::query_scalar("SELECT user_id FROM notifications ORDER BY user_id")
        .fetch_all(&app.db)
        .await
        .unwrap();
    assert_eq!(
        stored,
        [201, 202, 203, 204],
        "the abandoned request is not stored"
    );
}
