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
