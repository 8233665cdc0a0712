//! History past its retention leaves every table together; work still to do stays.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{spawn_app, wait_until};

async fn count(app: &crate::helpers::TestApp, sql: &'static str, id: Uuid) -> i64 {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_purge_deletes_finished_history_from_every_table_and_keeps_what_is_still_to_send() {
    let app = spawn_app().await;
    let request = |scheduled: Option<String>| {
        json!({
            "userId": 61,
            "recipient": { "email": "keep@example.com", "locale": "en" },
            "eventType": "ORDER_SHIPPED",
            "data": { "orderId": "o-61" },
            "scheduledAt": scheduled,
        })
    };
    let sent: Value = app
        .post_json("/api/v1/notifications", &request(None), &[])
        .await
        .json()
        .await
        .unwrap();
    let sent = Uuid::parse_str(sent["notificationId"].as_str().unwrap()).unwrap();
    let later = (chrono::Utc::now() + chrono::Duration::days(3)).to_rfc3339();
    let waiting: Value = app
        .post_json("/api/v1/notifications", &request(Some(later)), &[])
        .await
        .json()
        .await
        .unwrap();
    let waiting = Uuid::parse_str(waiting["notificationId"].as_str().unwrap()).unwrap();
    wait_until(60, "both deliveries are sent and projected", || async {
        count(
            &app,
            "SELECT count(*) FROM notification_log l JOIN deliveries d ON d.id = l.delivery_id \
             WHERE d.notification_id = $1 AND l.status = 'SUCCESS'",
            sent,
        )
        .await
            == 2
    })
    .await;
    let stats_today: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_stats")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(stats_today > 0);
    sqlx::query(
        "INSERT INTO delivery_stats (day, channel, success) VALUES ('2020-01-01', 'EMAIL', 5)",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let tz = app.settings.read_model.reporting_timezone;

    // A cutoff before everything deletes nothing.
    let early = chrono::Utc::now() - chrono::Duration::days(1);
    let nothing = herald::retention::purge(&app.db, herald::retention::Cutoffs::at(early), tz)
        .await
        .unwrap()
        .expect("no other instance purges");
    assert_eq!(nothing.notifications, 0);
    assert_eq!(nothing.log_rows, 0);
    assert_eq!(
        nothing.stats_rows, 1,
        "only the 2020 statistics are that old"
    );

    // A cutoff after both: the finished one goes from every table, the waiting one stays.
    let purged = herald::retention::purge(
        &app.db,
        herald::retention::Cutoffs::at(chrono::Utc::now()),
        tz,
    )
    .await
    .unwrap()
    .expect("no other instance purges");
    assert_eq!(purged.notifications, 1);
    assert_eq!(purged.log_rows, 2);
    for sql in [
        "SELECT count(*) FROM notifications WHERE id = $1",
        "SELECT count(*) FROM deliveries WHERE notification_id = $1",
        "SELECT count(*) FROM notification_log WHERE notification_id = $1",
    ] {
        assert_eq!(count(&app, sql, sent).await, 0, "{sql}");
    }
    assert_eq!(
        app.get(&format!("/api/v1/notifications/{sent}"))
            .await
            .status(),
        404
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM deliveries WHERE notification_id = $1",
            waiting
        )
        .await,
        2,
        "deliveries still to send are never dropped"
    );
    let kept: Value = app
        .get(&format!("/api/v1/notifications/{waiting}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(kept["status"], "PENDING");
    let stats_left: i64 = sqlx::query_scalar("SELECT count(*) FROM delivery_stats")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stats_left, stats_today, "today's statistics stay");
}

#[tokio::test]
async fn dead_letters_dealt_with_go_after_their_retention_and_pending_ones_stay() {
    let app = spawn_app().await;
    // (status, retry outcome, actioned how long ago in days)
    let letters = [
        ("DISCARDED", None, 40),
        ("RETRIED", Some("ACCEPTED"), 40),
        ("RETRIED", Some("POISON"), 40),
        ("DISCARDED", None, 5),
        ("PENDING", None, 400),
    ];
    for (i, (status, outcome, days)) in letters.iter().enumerate() {
        sqlx::query(
            "INSERT INTO dlq_messages (id, domain, topic, kafka_partition, kafka_offset, payload, \
                 status, retry_outcome, actioned_at, failed_at) \
             VALUES ($1, 'payment', 'notification.dlq.payment', 0, $2, '\\x7b7d', $3, $4, \
                 CASE WHEN $3 = 'PENDING' THEN NULL ELSE now() - make_interval(days => $5) END, \
                 now() - make_interval(days => $5))",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(i as i64)
        .bind(status)
        .bind(outcome)
        .bind(*days)
        .execute(&app.db)
        .await
        .unwrap();
    }
    let settings = &app.settings.retention;
    assert_eq!(
        settings.dead_letters,
        std::time::Duration::from_secs(30 * 86_400)
    );
    let now = chrono::Utc::now();
    let cutoffs = herald::retention::Cutoffs {
        history: now - settings.history,
        dead_letters: now - settings.dead_letters,
    };
    // The instance's own round (it purges at start) may hold the lock a moment: wait for it.
    // Whichever round deletes them, the same letters must be gone.
    wait_until(30, "a purge round runs", || async {
        herald::retention::purge(&app.db, cutoffs, app.settings.read_model.reporting_timezone)
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let left: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, retry_outcome FROM dlq_messages ORDER BY kafka_offset")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(
        left,
        [
            ("RETRIED".to_owned(), Some("POISON".to_owned())),
            ("DISCARDED".to_owned(), None),
            ("PENDING".to_owned(), None),
        ]
    );
}
