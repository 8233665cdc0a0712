//! Hostile input over HTTP and Kafka: always a 4xx or a dead letter, never a 5xx or a
//! panic, and never a lost neighbour.

use serde_json::{Value, json};

use crate::helpers::{envelope, spawn_front_half, wait_until};

fn deep(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

#[tokio::test]
async fn hostile_http_bodies_get_4xx_and_the_service_keeps_working() {
    let app = spawn_front_half(|_| {}).await;
    let big = format!(
        r#"{{"userId": 1, "subject": "s", "body": "{}", "channels": ["EMAIL"]}}"#,
        "x".repeat(1024 * 1024)
    );
    let bodies: Vec<Vec<u8>> = vec![
        vec![0xff, 0xfe, 0xfd],
        b"\x00\x01\x02".to_vec(),
        big.into_bytes(),
        deep(10_000).into_bytes(),
        format!(r#"{{"userId": {}}}"#, "9".repeat(400)).into_bytes(),
        br#"{"userId": 1e400, "eventType": "ORDER_SHIPPED"}"#.to_vec(),
        br#"{"userId": "1", "eventType": ["ORDER_SHIPPED"]}"#.to_vec(),
        br#"{"userId": 1, "eventType": "ORDER_SHIPPED", "data": {"a": "\u0000"}}"#.to_vec(),
        br#"{"channels": {"EMAIL": "yes"}, "eventTypes": 3}"#.to_vec(),
        br#"null"#.to_vec(),
        b"".to_vec(),
    ];
    let targets = [
        ("POST", "/api/v1/notifications"),
        ("PUT", "/api/v1/notifications/settings?userId=1"),
        ("PUT", "/api/v1/users/1/contact"),
    ];
    for (verb, path) in targets {
        for body in &bodies {
            let response = app
                .http
                .request(verb.parse().unwrap(), format!("{}{path}", app.address))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = response.status();
            assert!(
                status != 401 && status != 403,
                "{verb} {path}: refused for its credential"
            );
            assert!(
                status.is_client_error(),
                "{verb} {path} with {:?}...: {status}",
                String::from_utf8_lossy(&body[..body.len().min(40)])
            );
            let error: Value = response.json().await.unwrap();
            assert!(error["error"]["code"].is_string(), "{error}");
        }
    }
    let fine = app
        .post_json(
            "/api/v1/notifications",
            &json!({ "userId": 1, "channels": ["IN_APP"], "subject": "s", "body": "b" }),
            &[],
        )
        .await;
    assert_eq!(fine.status(), 202);
}

#[tokio::test]
async fn hostile_kafka_messages_are_dead_lettered_without_losing_their_neighbours() {
    let app = spawn_front_half(|_| {}).await;
    let mut huge_number = envelope("ORDER_SHIPPED", 3, json!({}));
    huge_number["userId"] = json!(1e300);
    let hostile: Vec<Vec<u8>> = vec![
        vec![0xc3, 0x28, 0xa0, 0xa1],
        vec![b'{'; 70 * 1024],
        deep(20_000).into_bytes(),
        huge_number.to_string().into_bytes(),
        br#"{"eventId": {"$gt": ""}, "eventType": 1, "userId": [], "occurredAt": null}"#.to_vec(),
    ];
    let mut messages = Vec::new();
    let mut good = Vec::new();
    for bytes in hostile {
        let event = envelope("ORDER_SHIPPED", 3, json!({ "orderId": "o" }));
        messages.push(("3".to_owned(), bytes));
        messages.push(("3".to_owned(), event.to_string().into_bytes()));
        good.push(event["eventId"].as_str().unwrap().to_owned());
    }

    app.publish_all("fluxpay.order.events", &messages).await;
    wait_until(40, "every good neighbour is stored", || async {
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notifications WHERE event_id = ANY($1)")
                .bind(&good)
                .fetch_one(&app.db)
                .await
                .unwrap();
        stored == good.len() as i64
    })
    .await;

    let classes: Vec<String> = app
        .dead_letters()
        .await
        .iter()
        .map(|(_, h, _)| h["X-Error-Class"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        classes,
        [
            "decode",
            "oversize",
            "decode",
            "invalid_field",
            "invalid_field"
        ]
    );
}
