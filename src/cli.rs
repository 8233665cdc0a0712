//! The command line: `serve`, `migrate`, `topics create` and `demo`.

use clap::{Parser, Subcommand};

use crate::{
    config::Settings,
    db, demo,
    kafka::{KafkaAdmin, TopicCatalogue, TopicOutcome},
    read_model::{Projector, projector},
    roles::Role,
    startup::Application,
};

/// Herald: event-driven notification delivery.
///
/// Consumes payment, subscription and order events from Kafka (or takes notifications over
/// HTTP), routes each to its channels (email, Slack, in-app, SMS, KakaoTalk, push), delivers
/// with retries and dead-lettering, and keeps a queryable history.
///
/// Configuration: config/default.toml (or HERALD_CONFIG_FILE), overridden by HERALD_*
/// variables; see README.md.
#[derive(Debug, Parser)]
#[command(name = "herald", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run Herald: the HTTP API and the workers of the chosen roles, until SIGINT/SIGTERM.
    ///
    /// Applies pending migrations first. Health (/health/live, /health/ready) and
    /// Prometheus metrics (/metrics) are served whatever the roles.
    Serve {
        /// Roles to run, comma-separated; every role when omitted.
        #[arg(long, value_delimiter = ',', value_enum, default_values_t = Role::ALL)]
        roles: Vec<Role>,
    },
    /// Apply pending database migrations and exit. Safe to run again.
    Migrate,
    /// Manage Herald's Kafka topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Publish the sample events of the seed scenarios, then print what to look at.
    Demo,
    /// Manage the read model (notification_log, delivery_stats).
    ReadModel {
        #[command(subcommand)]
        command: ReadModelCommand,
    },
}

/// Read-model management.
#[derive(Debug, Subcommand)]
pub enum ReadModelCommand {
    /// Empty notification_log and delivery_stats and replay notification.delivery.events
    /// from the beginning. Safe while projectors run (replayed events are idempotent).
    Rebuild,
}

/// Topic management.
#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create every topic of the catalogue (kafka/topics.toml) that does not exist yet,
    /// with HERALD_TOPIC_PREFIX prepended. Existing topics are left alone.
    Create,
}

/// Carries out one command with validated settings.
pub async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve { roles } => {
            let app = Application::build(settings, &roles).await?;
            let shutdown = app.shutdown_token();
            tokio::spawn(async move {
                stop_signal().await;
                tracing::info!("stop signal received");
                shutdown.cancel();
            });
            app.run_until_stopped().await
        }
        Command::Migrate => {
            let pool = db::pool(&settings.database)?;
            db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Topics {
            command: TopicsCommand::Create,
        } => {
            let catalogue = TopicCatalogue::load(&settings.kafka.topics_file)?;
            let admin = KafkaAdmin::new(&settings.kafka)?;
            for (name, outcome) in admin.create_topics(&catalogue).await? {
                let what = match outcome {
                    TopicOutcome::Created => "created",
                    TopicOutcome::AlreadyExisted => "exists",
                };
                println!("{what:>8}  {name}");
            }
            Ok(())
        }
        Command::Demo => demo::run(&settings).await,
        Command::ReadModel {
            command: ReadModelCommand::Rebuild,
        } => {
            let pool = db::pool(&settings.database)?;
            db::migrate(&pool).await?;
            let projector = Projector {
                db: pool,
                reporting_tz: settings.read_model.reporting_timezone,
            };
            let rebuilt = projector::rebuild(&projector, &settings.kafka).await?;
            println!(
                "read model rebuilt: {} events replayed, {} deliveries in notification_log",
                rebuilt.events, rebuilt.deliveries
            );
            Ok(())
        }
    }
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
async fn stop_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler succeeds on Unix");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
