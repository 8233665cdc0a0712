//! Replaying dead letters by filter (dry run, rate, cancel, the replay cap) and correcting
//! them first (issue 16).

use std::time::Duration;

use crate::helpers::{
    TestApp, envelope, read_topic, slack_mock, slack_url, spawn_app_with, wait_for_delivery,
    wait_until,
};
use serde_json::{Value, json};
use uuid::Uuid;

/// An operator's client: an API key with `dlq:admin`, named alice.
struct Operator<'a> {
    app: &'a TestApp,
    key: String,
}

impl<'a> Operator<'a> {
    async fn new(app: &'a TestApp) -> Self {
        let key = app.api_key("alice", &["dlq:admin"]).await;
        Operator { app, key }
    }

    async fn call(&self, verb: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .app
            .http
            .request(verb, format!("{}{path}", self.app.address))
            .bearer_auth(&self.key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PATCH, path, Some(body)).await
    }

    async fn letters(&self, query: &str) -> Vec<Value> {
        self.get(&format!("/api/v1/admin/dlq?limit=500{query}"))
            .await["items"]
            .as_array()
            .unwrap()
            .clone()
    }

    async fn replay(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/admin/dlq/replays/{id}")).await
    }
}

async fn slack_successes(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM deliveries WHERE channel = 'SLACK' AND status = 'SUCCESS'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_dry_run_changes_nothing_a_replay_keeps_its_rate_stops_when_cancelled_and_no_letter_is_replayed_twice()
 {
    // Slack refuses the first 30 messages for good (404), then takes everything.
    let slack = slack_mock(&[(404, Some(30)), (200, None)]).await;
    let url = slack_url(&slack);
    let app = spawn_app_with(move |s| s.channels.slack_webhook_url = Some(url.into())).await;
    let operator = Operator::new(&app).await;
    let mut messages = Vec::new();
    for user in 1..=30 {
        let event = envelope(
            "PAYMENT_FAILED",
            user,
            json!({ "orderId": format!("o-{user}"), "amount": 1, "currency": "KRW", "reason": "r" }),
        );
        messages.push((user.to_string(), event.to_string().into_bytes()));
    }
    for i in 0..10 {
        messages.push(("1".to_owned(), format!("{{not json {i}").into_bytes()));
        let mut violation = envelope("PAYMENT_COMPLETED", 100 + i, json!({}));
        violation["data"] = json!({ "amount": format!("{i} won"), "currency": "KRW" });
        messages.push(("1".to_owned(), violation.to_string().into_bytes()));
    }
    app.publish_all("fluxpay.payment.events", &messages).await;
    wait_until(60, "50 dead letters are stored", || async {
        operator.letters("").await.len() == 50
    })
    .await;

    // A dry run says what would happen and does nothing.
    let (status, dry) = operator
        .post("/api/v1/admin/dlq/replay", json!({ "dryRun": true }))
        .await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["matched"], 50, "{dry}");
    assert_eq!(dry["requeue"], 30, "{dry}");
    assert_eq!(dry["reingest"], 20, "{dry}");
    assert_eq!(
        dry["reingestStillPoison"],
        json!({ "decode": 10, "schema_violation": 10 }),
        "as they stand, the poison messages would fail again"
    );
    let (_, slack_only) = operator
        .post(
            "/api/v1/admin/dlq/replay",
            json!({ "dryRun": true, "filter": { "failedChannel": "slack" } }),
        )
        .await;
    assert_eq!(slack_only["matched"], 30, "{slack_only}");
    assert_eq!(slack_only["reingest"], 0, "{slack_only}");
    assert_eq!(operator.letters("&status=PENDING").await.len(), 50);
    assert_eq!(slack.received_requests().await.unwrap().len(), 30);

    // Bad requests say why.
    for body in [
        json!({ "ratePerSecond": 0 }),
        json!({ "ratePerSecond": 5000 }),
        json!({ "filter": { "status": "RETRIED" } }),
        json!({ "filter": { "limit": 5 } }),
        json!({ "filter": { "from": "yesterday" } }),
        json!({ "speed": 3 }),
    ] {
        let (status, error) = operator
            .post("/api/v1/admin/dlq/replay", body.clone())
            .await;
        assert_eq!(status, 400, "{body}: {error}");
        assert!(error["error"]["message"].is_string(), "{error}");
    }

    // A replay at 10 letters a second, cancelled part way.
    let (status, replay) = operator
        .post(
            "/api/v1/admin/dlq/replay",
            json!({ "filter": { "failedChannel": "SLACK" }, "ratePerSecond": 10 }),
        )
        .await;
    assert_eq!(status, 202, "{replay}");
    assert_eq!(replay["total"], 30, "{replay}");
    assert_eq!(replay["status"], "RUNNING");
    let id = replay["id"].as_str().unwrap().to_owned();
    wait_until(20, "the replay is under way", || async {
        operator.replay(&id).await["done"].as_i64().unwrap() >= 8
    })
    .await;
    let (status, cancelled) = operator
        .post(&format!("/api/v1/admin/dlq/replays/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "CANCELLED");
    assert_eq!(cancelled["cancelledBy"], "alice");
    let done_at_cancel = cancelled["done"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = operator.replay(&id).await;
    let done = after["done"].as_i64().unwrap();
    assert!(
        done <= done_at_cancel + 1,
        "a cancelled replay stops (at most the letter in hand finishes): {done_at_cancel} then {done}"
    );
    assert!(done < 30, "{after}");
    assert_eq!(after["requeued"], done);
    let (status, _) = operator
        .post(&format!("/api/v1/admin/dlq/replays/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 409, "a finished replay cannot be cancelled");

    // The rate held: the letters it did were spread over at least (n - 1) / 10 seconds.
    let spread: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(done_at) - min(done_at))::float8 FROM dlq_replay_items \
         WHERE replay_id = $1::uuid AND outcome IS NOT NULL",
    )
    .bind(&id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(
        spread >= (done - 1) as f64 / 10.0 * 0.9,
        "{done} letters in {spread} s at 10 a second"
    );

    // The rest, in a second replay at full speed: together each failed delivery was sent
    // exactly once more.
    wait_until(20, "the replayed deliveries are sent", || async {
        slack_successes(&app).await == done
    })
    .await;
    let (status, rest) = operator
        .post(
            "/api/v1/admin/dlq/replay",
            json!({ "filter": { "failedChannel": "SLACK" }, "ratePerSecond": 1000 }),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(
        rest["total"],
        30 - done,
        "letters replayed before are not pending: {rest}"
    );
    let rest_id = rest["id"].as_str().unwrap().to_owned();
    wait_until(30, "the second replay completes", || async {
        operator.replay(&rest_id).await["status"] == "COMPLETED"
    })
    .await;
    wait_until(30, "every Slack delivery is sent", || async {
        slack_successes(&app).await == 30
    })
    .await;
    assert_eq!(
        slack.received_requests().await.unwrap().len(),
        60,
        "30 refused, then each sent once more"
    );
    let listed = operator.get("/api/v1/admin/dlq/replays").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2, "{listed}");

    // Where each re-sent delivery came from: on the row, the letter and the delivery events.
    let letter = &operator
        .letters("&failedChannel=SLACK&status=RETRIED")
        .await[0];
    assert_eq!(letter["replayCount"], 1, "{letter}");
    assert!(
        letter["actionedBy"]
            .as_str()
            .unwrap()
            .starts_with("alice (replay "),
        "{letter}"
    );
    let delivery: Uuid = letter["deliveryId"].as_str().unwrap().parse().unwrap();
    let origin: (Option<Uuid>, Option<i32>) =
        sqlx::query_as("SELECT replay_of, replay_count FROM deliveries WHERE id = $1")
            .bind(delivery)
            .fetch_one(&app.db)
            .await
            .unwrap();
    let dead_letter_id: Uuid = letter["deadLetterId"].as_str().unwrap().parse().unwrap();
    assert_eq!(origin, (Some(dead_letter_id), Some(1)));
    let expected = json!({ "deadLetterId": dead_letter_id, "replayCount": 1 });
    let events = read_topic(
        &app.settings,
        "notification.delivery.events",
        30,
        |records| {
            records.iter().any(|r| {
                serde_json::from_slice::<Value>(&r.payload).is_ok_and(|e| {
                    e["deliveryId"] == delivery.to_string()
                        && e["status"] == "SUCCESS"
                        && e["replay"] == expected
                })
            })
        },
    )
    .await;
    let replayed: Vec<Value> = events
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.payload).ok())
        .filter(|e| e["deliveryId"] == delivery.to_string())
        .collect();
    assert!(
        replayed
            .iter()
            .any(|e| e["status"] == "PENDING" && e["replay"] == expected),
        "the re-queue's event names the letter: {replayed:?}"
    );
    assert!(
        replayed
            .iter()
            .any(|e| e["status"] == "SUCCESS" && e["replay"] == expected),
        "and so does the send's: {replayed:?}"
    );
    assert!(
        replayed
            .iter()
            .any(|e| e["status"] == "FAILED" && e.get("replay").is_none()),
        "the first failure was no replay: {replayed:?}"
    );
}

#[tokio::test]
async fn beyond_the_replay_cap_a_retry_needs_force_and_a_letter_failing_again_carries_its_count() {
    let app = spawn_app_with(|s| s.dlq.replay_cap = 1).await;
    let operator = Operator::new(&app).await;
    let mut unknown = envelope("PAYMENT_REFUNDED_TWICE", 7, json!({}));
    unknown["data"] = json!({ "n": 1 });
    app.publish(
        "fluxpay.payment.events",
        "7",
        unknown.to_string().as_bytes(),
    )
    .await;
    wait_until(30, "the dead letter is stored", || async {
        operator.letters("").await.len() == 1
    })
    .await;
    let first = operator.letters("").await[0].clone();
    let first_id = first["id"].as_str().unwrap();
    assert_eq!(first["replayCount"], 0);

    let (status, retried) = operator
        .post(&format!("/api/v1/admin/dlq/{first_id}/retry"), json!({}))
        .await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["deadLetter"]["retryOutcome"], "POISON");
    assert_eq!(retried["deadLetter"]["replayCount"], 1);
    // Still unknown: a new letter, which carries where it came from and the count.
    wait_until(30, "the replay's own letter is stored", || async {
        operator.letters("&status=PENDING").await.len() == 1
    })
    .await;
    let second = operator.letters("&status=PENDING").await[0].clone();
    assert_ne!(second["id"], first["id"]);
    assert_eq!(second["headers"]["X-Replay-Of"], first["deadLetterId"]);
    assert_eq!(second["headers"]["X-Replay-Count"], "1");
    assert_eq!(second["replayCount"], 1);

    let second_id = second["id"].as_str().unwrap();
    let (status, refused) = operator
        .post(&format!("/api/v1/admin/dlq/{second_id}/retry"), json!({}))
        .await;
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("force"),
        "{refused}"
    );
    let (_, dry) = operator
        .post("/api/v1/admin/dlq/replay", json!({ "dryRun": true }))
        .await;
    assert_eq!(dry["skipped"], json!({ "replay_cap": 1 }), "{dry}");
    let (_, forced) = operator
        .post(
            "/api/v1/admin/dlq/replay",
            json!({ "dryRun": true, "force": true }),
        )
        .await;
    assert_eq!(forced["reingest"], 1, "{forced}");
    let (status, forced) = operator
        .post(
            &format!("/api/v1/admin/dlq/{second_id}/retry?force=true"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{forced}");
    assert_eq!(forced["deadLetter"]["replayCount"], 2);
}

#[tokio::test]
async fn a_corrected_poison_message_is_ingested_once_and_its_original_stays_readable() {
    let app = spawn_app_with(|_| {}).await;
    let operator = Operator::new(&app).await;
    let mut event = envelope("PAYMENT_COMPLETED", 9, json!({}));
    event["data"] = json!({ "orderId": "o-9", "amount": "12 won", "currency": "KRW" });
    app.publish("fluxpay.payment.events", "9", event.to_string().as_bytes())
        .await;
    wait_until(30, "the dead letter is stored", || async {
        operator.letters("").await.len() == 1
    })
    .await;
    let letter = operator.letters("").await[0].clone();
    assert_eq!(letter["errorClass"], "schema_violation");
    let path = format!("/api/v1/admin/dlq/{}", letter["id"].as_str().unwrap());

    // A correction that would fail again, or of the wrong kind, is refused.
    let (status, error) = operator
        .patch(&path, json!({ "payload": event.clone() }))
        .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["code"], "invalid_correction");
    let (status, _) = operator
        .patch(&path, json!({ "data": { "amount": 12 } }))
        .await;
    assert_eq!(status, 400, "a poison message's correction is its payload");
    let (status, _) = operator
        .patch(&path, json!({ "payload": {}, "address": "a@b.c" }))
        .await;
    assert_eq!(status, 400);

    // A first correction with a typo, then the right one: each is audited from the one
    // before it.
    let mut typo = event.clone();
    typo["data"]["amount"] = json!(1200);
    let (status, _) = operator.patch(&path, json!({ "payload": typo })).await;
    assert_eq!(status, 200);
    let mut fixed = event.clone();
    fixed["data"]["amount"] = json!(12000);
    let (status, corrected) = operator
        .patch(&path, json!({ "payload": fixed.clone() }))
        .await;
    assert_eq!(status, 200, "{corrected}");
    let edits = corrected["edits"].as_array().unwrap();
    assert_eq!(edits.len(), 2);
    assert_eq!(edits[1]["before"]["data"]["amount"], 1200);
    assert_eq!(
        edits[1]["diff"],
        json!([{ "op": "replace", "path": "/data/amount", "value": 12000 }])
    );
    assert!(
        corrected["payload"].as_str().unwrap().contains("12 won"),
        "the original stays as it arrived"
    );
    let edited: Value = serde_json::from_str(corrected["edited"].as_str().unwrap()).unwrap();
    assert_eq!(edited["data"]["amount"], 12000);
    assert_eq!(edits[0]["editedBy"], "alice");
    assert_eq!(edits[0]["target"], "payload");
    assert_eq!(
        edits[0]["diff"],
        json!([{ "op": "replace", "path": "/data/amount", "value": 1200 }])
    );
    assert_eq!(edits[0]["before"]["data"]["amount"], "12 won");

    let (status, retried) = operator.post(&format!("{path}/retry"), json!({})).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried["deadLetter"]["retryOutcome"], "ACCEPTED");
    let deliveries: Vec<Uuid> = sqlx::query_scalar(
        "SELECT d.id FROM deliveries d JOIN notifications n ON n.id = d.notification_id \
         WHERE n.event_id = $1",
    )
    .bind(event["eventId"].as_str().unwrap())
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(deliveries.len(), 2, "EMAIL and IN_APP");
    for delivery in deliveries {
        wait_for_delivery(&app, delivery, "SUCCESS", 30).await;
    }
    let (amount, replay_of): (Value, Option<Uuid>) = sqlx::query_as(
        "SELECT n.data -> 'amount', d.replay_of FROM notifications n \
         JOIN deliveries d ON d.notification_id = n.id LIMIT 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(amount, json!(12000));
    assert_eq!(
        replay_of.map(|r| r.to_string()),
        letter["deadLetterId"].as_str().map(str::to_owned)
    );

    // Retried again (say, by a second operator): a duplicate, nothing sent twice.
    let (status, again) = operator.post(&format!("{path}/retry"), json!({})).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["deadLetter"]["retryOutcome"], "DUPLICATE");
    assert_eq!(app.notification_count().await, 1);
    // A letter dealt with is corrected no more.
    let (status, _) = operator.patch(&path, json!({ "payload": fixed })).await;
    assert_eq!(status, 409);
    let read = operator.get(&path).await;
    assert!(read["payload"].as_str().unwrap().contains("12 won"));
    assert_eq!(read["edits"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_failed_deliverys_address_and_data_are_corrected_checked_and_audited_before_its_retry() {
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{method, path},
    };
    let sms = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/send"))
        .respond_with(ResponseTemplate::new(400))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&sms)
        .await;
    Mock::given(method("POST"))
        .and(path("/send"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "messageId": "m-1" })))
        .with_priority(2)
        .mount(&sms)
        .await;
    let slack = slack_mock(&[(404, Some(1)), (200, None)]).await;
    let (sms_url, slack_url) = (format!("{}/send", sms.uri()), slack_url(&slack));
    let app = spawn_app_with(move |s| {
        s.channels.sms_gateway_url = Some(sms_url.parse().unwrap());
        s.channels.slack_webhook_url = Some(slack_url.into());
    })
    .await;
    let operator = Operator::new(&app).await;

    // An SMS to a number the gateway refuses.
    let response = app
        .post_json(
            "/api/v1/notifications",
            &json!({ "recipient": { "phone": "+821000000000" }, "channels": ["SMS"], "subject": "s", "body": "b" }),
            &[],
        )
        .await;
    assert_eq!(response.status(), 202);
    // A PAYMENT_FAILED whose Slack message was refused.
    let event = envelope(
        "PAYMENT_FAILED",
        11,
        json!({ "orderId": "o-11", "amount": 1, "currency": "KRW", "reason": "card declined" }),
    );
    app.publish("fluxpay.payment.events", "11", event.to_string().as_bytes())
        .await;
    wait_until(30, "two dead letters are stored", || async {
        operator.letters("").await.len() == 2
    })
    .await;
    let sms_letter = operator.letters("&failedChannel=SMS").await[0].clone();
    let slack_letter = operator.letters("&failedChannel=SLACK").await[0].clone();
    let sms_path = format!("/api/v1/admin/dlq/{}", sms_letter["id"].as_str().unwrap());
    let slack_path = format!("/api/v1/admin/dlq/{}", slack_letter["id"].as_str().unwrap());

    let (status, error) = operator
        .patch(&sms_path, json!({ "address": "call me" }))
        .await;
    assert_eq!(status, 422, "{error}");
    let (status, _) = operator
        .patch(&slack_path, json!({ "address": "#ops" }))
        .await;
    assert_eq!(status, 400, "Slack has no address to correct");
    let (status, _) = operator
        .patch(&sms_path, json!({ "payload": { "eventId": "x" } }))
        .await;
    assert_eq!(status, 400, "a delivery's letter has no payload to correct");
    let (status, _) = operator.patch(&sms_path, json!({})).await;
    assert_eq!(status, 400, "nothing to correct");
    let (status, error) = operator
        .patch(
            &slack_path,
            json!({ "data": { "orderId": "o-11", "amount": "one", "currency": "KRW", "reason": "r" } }),
        )
        .await;
    assert_eq!(
        status, 422,
        "data is checked against the event type's schema: {error}"
    );
    // The data is the notification's: corrected once its other deliveries are done.
    wait_until(30, "EMAIL and IN_APP are sent", || async {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM deliveries WHERE channel IN ('EMAIL', 'IN_APP') \
               AND status <> 'SUCCESS'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        busy == 0
    })
    .await;

    let (status, corrected) = operator
        .patch(&sms_path, json!({ "address": "+82 10-9999-8888" }))
        .await;
    assert_eq!(status, 200, "{corrected}");
    let edit = &corrected["edits"][0];
    assert_eq!(edit["target"], "delivery");
    assert_eq!(edit["before"]["address"], "+821000000000");
    assert_eq!(edit["after"]["address"], "+821099998888");
    let (status, corrected) = operator
        .patch(
            &slack_path,
            json!({ "data": { "orderId": "o-11", "amount": 1, "currency": "KRW", "reason": "card expired" } }),
        )
        .await;
    assert_eq!(status, 200, "{corrected}");
    assert_eq!(corrected["edits"][0]["editedBy"], "alice");

    for path in [&sms_path, &slack_path] {
        let (status, retried) = operator.post(&format!("{path}/retry"), json!({})).await;
        assert_eq!(status, 200, "{retried}");
    }
    for letter in [&sms_letter, &slack_letter] {
        let delivery: Uuid = letter["deliveryId"].as_str().unwrap().parse().unwrap();
        wait_for_delivery(&app, delivery, "SUCCESS", 30).await;
    }
    let sent = sms.received_requests().await.unwrap();
    assert_eq!(sent.len(), 2);
    assert!(
        String::from_utf8_lossy(&sent[1].body).contains("+821099998888"),
        "the retry goes to the corrected number"
    );
    let posted = slack.received_requests().await.unwrap();
    assert_eq!(posted.len(), 2);
    assert!(
        String::from_utf8_lossy(&posted[1].body).contains("card expired"),
        "the retry renders the corrected data"
    );
    let history = operator.get(&slack_path).await;
    assert_eq!(history["edits"].as_array().unwrap().len(), 1);
    assert_eq!(
        history["edits"][0]["before"]["data"]["reason"],
        "card declined"
    );
}
