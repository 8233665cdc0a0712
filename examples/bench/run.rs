//! One isolated Herald run on the local stack: its own database, topic prefix and Redis
//! prefix, so that the phases of one benchmark (and runs of several) never see each
//! other's rows or messages.

use herald::{
    config::Settings,
    kafka::{KafkaAdmin, TopicCatalogue},
};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

/// An isolated run: settings pointing at a fresh database and fresh topics.
pub struct Run {
    /// A short tag unique to this run (event ids start with it).
    pub tag: String,
    pub settings: Settings,
}

impl Run {
    /// Creates the database (empty: Herald or [`Run::migrated_pool`] migrates it) and the
    /// catalogue's topics under a fresh prefix.
    pub async fn new(base: &Settings, label: &str) -> anyhow::Result<Self> {
        let tag = format!("{label}{}", &Uuid::new_v4().simple().to_string()[..8]);
        let mut settings = base.clone();
        let mut url = url::Url::parse(base.database_url())?;
        let mut admin = PgConnection::connect(url.as_str()).await?;
        let db = format!("herald_bench_{tag}");
        admin
            .execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{db}""#)))
            .await?;
        url.set_path(&db);
        settings.database.url = SecretString::from(url.to_string());
        settings.kafka.topic_prefix = format!("{tag}.");
        settings.redis.key_prefix = format!("{tag}:");
        KafkaAdmin::new(&settings.kafka)?
            .create_topics(&TopicCatalogue::load(&settings.kafka.topics_file)?)
            .await?;
        Ok(Run { tag, settings })
    }

    /// The full name of a catalogue topic.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.settings.kafka.topic_prefix)
    }

    pub fn database_url(&self) -> &str {
        self.settings.database.url.expose_secret()
    }

    /// A pool on the run's database with Herald's schema applied.
    pub async fn migrated_pool(&self) -> anyhow::Result<PgPool> {
        let pool = herald::db::pool(&self.settings.database)?;
        herald::db::migrate(&pool).await?;
        Ok(pool)
    }
}
