use herald::db;

use crate::helpers::spawn_app;

#[tokio::test]
async fn migrations_apply_twice_without_error_and_create_the_core_schema() {
    // spawn_app has migrated once already.
    let app = spawn_app().await;

    db::migrate(&app.db).await.expect("a second run succeeds");
    db::migrate(&app.db).await.expect("a third run succeeds");

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(applied as usize, db::MIGRATOR.iter().count());
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    for table in [
        "notifications",
        "deliveries",
        "delivery_attempts",
        "delivery_attempt_log",
        "idempotency_keys",
        "outbox",
        "user_contacts",
        "user_preferences",
        "notification_log",
        "delivery_stats",
        "dlq_messages",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
    // The notifications' unique key took its place (migration 0009).
    assert!(
        !tables.iter().any(|t| t == "processed_events"),
        "{tables:?}"
    );
    // The tables every event changes are vacuumed and analysed early (migration 0021).
    let options: Option<Vec<String>> =
        sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = 'deliveries'::regclass")
            .fetch_one(&app.db)
            .await
            .unwrap();
    let options = options.unwrap_or_default();
    assert!(
        options.contains(&"autovacuum_vacuum_scale_factor=0.01".to_owned()),
        "{options:?}"
    );
}

#[tokio::test]
async fn the_schema_rejects_a_second_delivery_for_the_same_channel() {
    let app = spawn_app().await;
    let notification = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO notifications (id, source, domain, event_type, locale) \
         VALUES ($1, 'api', 'api', 'SYSTEM_INCIDENT', 'en')",
    )
    .bind(notification)
    .execute(&app.db)
    .await
    .unwrap();
    let insert = || {
        sqlx::query(
            "INSERT INTO deliveries (id, notification_id, channel, status) \
             VALUES ($1, $2, 'SLACK', 'PENDING')",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(notification)
        .execute(&app.db)
    };

    insert().await.expect("the first delivery is stored");
    let second = insert().await.expect_err("the second is refused");

    assert!(
        second
            .as_database_error()
            .is_some_and(|e| e.is_unique_violation()),
        "{second}"
    );
}
