//! What the benchmarks share: settings for an isolated run on the local stack.

use herald::{
    config::Settings,
    kafka::{KafkaAdmin, TopicCatalogue},
};
use secrecy::SecretString;
use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

/// The environment's settings with a database, topic prefix and Redis prefix of this run's
/// own, the database created and the topics made.
pub async fn isolated_settings() -> anyhow::Result<Settings> {
    herald::telemetry::init_tracing(herald::telemetry::LogFormat::Text);
    let mut settings = Settings::load()?;
    let run = Uuid::new_v4().simple().to_string();
    let mut url = url::Url::parse(settings.database_url())?;
    let mut admin = PgConnection::connect(url.as_str()).await?;
    let db = format!("herald_bench_{}", &run[..12]);
    admin
        .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{db}""#)))
        .await?;
    url.set_path(&db);
    settings.database.url = SecretString::from(url.to_string());
    settings.kafka.topic_prefix = format!("bench{}.", &run[..8]);
    settings.redis.key_prefix = format!("bench{}:", &run[..8]);
    settings.http.addr = "127.0.0.1:0".parse()?;
    KafkaAdmin::new(&settings.kafka)?
        .create_topics(&TopicCatalogue::load(&settings.kafka.topics_file)?)
        .await?;
    Ok(settings)
}

/// The first command-line argument as a number, or `default`.
pub fn arg(position: usize, default: usize) -> anyhow::Result<usize> {
    Ok(std::env::args()
        .nth(position)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(default))
}
