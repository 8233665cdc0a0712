//! The planner's statistics of young tables kept up to date (`herald::statistics`).

use crate::helpers::{spawn_front_half, wait_until};

/// (reltuples, analysed by hand or by Herald) of `table`.
async fn stats_of(db: &sqlx::PgPool, table: &str) -> (f32, bool) {
    sqlx::query_as(
        "SELECT c.reltuples, s.last_analyze IS NOT NULL FROM pg_class c \
         JOIN pg_stat_user_tables s ON s.relid = c.oid \
         WHERE c.relname = $1 AND s.schemaname = current_schema()",
    )
    .bind(table)
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_table_that_outgrew_its_statistics_is_analysed_and_a_quiet_one_is_left_alone() {
    let app = spawn_front_half(|_| {}).await;
    assert!(!stats_of(&app.db, "idempotency_keys").await.1);

    sqlx::query(
        "INSERT INTO idempotency_keys (credential, idempotency_key, request_hash, \
             response_status, response_body) \
         SELECT 'key', 'k-' || n, 'h', 202, '{}' FROM generate_series(1, 3000) n",
    )
    .execute(&app.db)
    .await
    .unwrap();
    app.outbox_row("delivery_event", "quiet", &[b"one"]).await;

    wait_until(20, "Herald analysed the table that grew", || async {
        stats_of(&app.db, "idempotency_keys").await.1
    })
    .await;
    assert_eq!(stats_of(&app.db, "idempotency_keys").await.0, 3000.0);
    // With the small sample: 11 histogram bounds for 3,000 distinct keys, where the default
    // statistics target gives 101.
    let bounds: i32 = sqlx::query_scalar(
        "SELECT array_length(histogram_bounds::text::text[], 1) FROM pg_stats \
         WHERE schemaname = current_schema() AND tablename = 'idempotency_keys' \
           AND attname = 'idempotency_key'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(bounds, 11);
    // One row is no reason to analyse.
    assert!(!stats_of(&app.db, "outbox").await.1);
    // Nor is anything once the statistics are up to date, however much the rows churn:
    // autovacuum keeps a table of steady size up to date.
    for _ in 0..2 {
        sqlx::query("UPDATE idempotency_keys SET request_hash = request_hash || 'x'")
            .execute(&app.db)
            .await
            .unwrap();
    }
    wait_until(10, "the updates are counted", || async {
        let changed: i64 = sqlx::query_scalar(
            "SELECT n_mod_since_analyze FROM pg_stat_user_tables \
             WHERE relname = 'idempotency_keys' AND schemaname = current_schema()",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        changed >= 6000
    })
    .await;
    assert_eq!(
        herald::statistics::analyze_outgrown(&app.db).await.unwrap(),
        Vec::<String>::new()
    );
}
