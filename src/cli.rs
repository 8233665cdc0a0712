//! The command line: `serve`, `migrate`, `topics create`, `demo`, `read-model rebuild`,
//! `broadcast`, `keys` and `users token`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use secrecy::SecretString;
use serde_json::{Value, json};

use crate::{
    auth::{Scope, keys, user_token},
    broadcast::client::{Client, Ending, progress_line},
    config::{Settings, parse_duration},
    db, demo,
    domain::UserId,
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
// Parsed once per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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
    /// Create, follow and cancel broadcasts through a running Herald's API.
    Broadcast {
        /// The API's base URL; http://HERALD_HTTP_ADDR when omitted.
        #[arg(long, env = "HERALD_API_URL", global = true)]
        api: Option<String>,
        /// An API key with broadcasts:write and broadcasts:read; HERALD_ADMIN_TOKEN when
        /// omitted.
        #[arg(long, env = "HERALD_API_KEY", global = true, hide_env_values = true)]
        api_key: Option<String>,
        #[command(subcommand)]
        command: BroadcastCommand,
    },
    /// Create, list and revoke API keys (in the database HERALD_DATABASE_URL names).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// End users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
}

/// API key commands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key and print it: the only time it is shown (Herald keeps only a digest).
    Create {
        /// Who or what uses the key, such as billing-service; audit fields record it.
        #[arg(long)]
        name: String,
        /// Comma-separated scopes: notifications:write, notifications:read, users:write,
        /// users:read, broadcasts:write, broadcasts:read, dashboard:read, dlq:admin,
        /// keys:admin, templates:read, templates:write.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
    },
    /// List every key (never the keys themselves), newest first.
    List,
    /// Revoke a key by its id: every instance refuses it within seconds.
    Revoke { id: uuid::Uuid },
}

/// End-user commands.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Print a user token (HS256, signed with HERALD_USER_TOKEN_SECRET) for trying the
    /// user routes; an app's backend mints its own (see README.md).
    Token {
        /// The user id.
        user_id: i64,
        /// How long the token is valid: 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

/// Broadcast commands. `create` and `status --follow` exit 0 when the broadcast
/// COMPLETED, 1 when it ended FAILED or CANCELLED.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum BroadcastCommand {
    /// Start a broadcast and follow it with a progress bar (unless --no-follow).
    ///
    /// The audience is --user-ids, or a segment of the user directory (--age-min,
    /// --age-max, --locale, --tag; none of them: every user). The content is --event-type
    /// with --data, or --subject with --body.
    Create {
        /// A label for people.
        #[arg(long)]
        name: Option<String>,
        /// Explicit recipients, comma-separated.
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["age_min", "age_max", "locale", "tag"])]
        user_ids: Vec<i64>,
        #[arg(long)]
        age_min: Option<u32>,
        #[arg(long)]
        age_max: Option<u32>,
        /// ko or en.
        #[arg(long)]
        locale: Option<String>,
        /// A tag every recipient must carry (repeatable).
        #[arg(long)]
        tag: Vec<String>,
        /// Channels, comma-separated (EMAIL, IN_APP, SMS, KAKAOTALK, PUSH).
        #[arg(long, value_delimiter = ',', required = true)]
        channels: Vec<String>,
        /// A templated event type, such as SUBSCRIPTION_EXPIRING.
        #[arg(long, conflicts_with_all = ["subject", "body"])]
        event_type: Option<String>,
        /// The template's data, as a JSON object.
        #[arg(long, requires = "event_type")]
        data: Option<String>,
        #[arg(long, requires = "body")]
        subject: Option<String>,
        #[arg(long, requires = "subject")]
        body: Option<String>,
        /// Start no earlier than this (RFC 3339).
        #[arg(long)]
        scheduled_at: Option<String>,
        /// Makes a retried command return the broadcast created the first time.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Print the broadcast id and return at once.
        #[arg(long)]
        no_follow: bool,
    },
    /// Show a broadcast (with --follow: until it ends, with a progress bar).
    Status {
        id: String,
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a broadcast: deliveries not yet sent are skipped.
    Cancel { id: String },
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
        Command::Broadcast {
            api,
            api_key,
            command,
        } => {
            let api = api.unwrap_or_else(|| format!("http://{}", settings.http.addr));
            let credential = api_key
                .map(SecretString::from)
                .or_else(|| settings.admin.token.clone())
                .context("give --api-key (or HERALD_API_KEY): the API needs a credential")?;
            broadcast_command(&Client::new(&api, &credential)?, command).await
        }
        Command::Keys { command } => keys_command(&settings, command).await,
        Command::Users {
            command: UsersCommand::Token { user_id, ttl },
        } => {
            let secret = settings
                .access
                .user_token_secret
                .as_ref()
                .context("HERALD_USER_TOKEN_SECRET is not set: user tokens are switched off")?;
            let user = UserId::new(user_id).map_err(anyhow::Error::msg)?;
            let ttl = parse_duration(&ttl).map_err(anyhow::Error::msg)?;
            println!("{}", user_token::mint(secret, user, ttl)?);
            Ok(())
        }
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

async fn keys_command(settings: &Settings, command: KeysCommand) -> anyhow::Result<()> {
    let pool = db::pool(&settings.database)?;
    db::migrate(&pool).await?;
    match command {
        KeysCommand::Create { name, scopes } => {
            let (name, scopes) = keys::parse_request(&name, &scopes).map_err(anyhow::Error::msg)?;
            let created = keys::create(&pool, &name, &scopes, "cli").await?;
            println!("id      {}", created.key.id);
            println!("name    {}", created.key.name);
            println!("scopes  {}", scope_list(&created.key.scopes));
            println!("key     {}", created.secret);
            println!();
            println!("The key is shown only now: Herald keeps a digest of it. Send it as");
            println!("  Authorization: Bearer {}", created.secret);
        }
        KeysCommand::List => {
            println!(
                "{:<36}  {:<24}  {:<12}  {:<20}  {:<20}  scopes",
                "id", "name", "key", "created", "revoked"
            );
            for key in keys::list(&pool).await? {
                let at = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map_or_else(
                        || "-".to_owned(),
                        |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
                    )
                };
                println!(
                    "{:<36}  {:<24}  {:<12}  {:<20}  {:<20}  {}",
                    key.id,
                    key.name,
                    format!("{}…", key.prefix),
                    at(Some(key.created_at)),
                    at(key.revoked_at),
                    scope_list(&key.scopes)
                );
            }
        }
        KeysCommand::Revoke { id } => match keys::revoke(&pool, id, "cli").await? {
            Some(key) => println!("revoked {} ({})", key.id, key.name),
            None => anyhow::bail!("no API key {id}"),
        },
    }
    Ok(())
}

fn scope_list(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

async fn broadcast_command(client: &Client, command: BroadcastCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    let (id, follow) = match command {
        BroadcastCommand::Create {
            name,
            user_ids,
            age_min,
            age_max,
            locale,
            tag,
            channels,
            event_type,
            data,
            subject,
            body,
            scheduled_at,
            idempotency_key,
            no_follow,
        } => {
            let audience = if user_ids.is_empty() {
                json!({"segment": {"ageMin": age_min, "ageMax": age_max, "locale": locale, "tags": tag}})
            } else {
                json!({"userIds": user_ids})
            };
            let data: Option<Value> = data
                .map(|d| serde_json::from_str(&d))
                .transpose()
                .context("--data must be a JSON object")?;
            let mut request = json!({
                "name": name, "audience": audience, "channels": channels, "eventType": event_type,
                "data": data, "subject": subject, "body": body, "scheduledAt": scheduled_at,
            });
            strip_nulls(&mut request);
            let created = client.create(&request, idempotency_key.as_deref()).await?;
            let id = created["broadcastId"]
                .as_str()
                .context("the API answered without a broadcastId")?
                .to_owned();
            println!(
                "broadcast {id} {}",
                created["status"].as_str().unwrap_or("?")
            );
            (id, !no_follow)
        }
        BroadcastCommand::Status { id, follow } => {
            if !follow {
                println!("{}", progress_line(&client.get(&id).await?));
            }
            (id, follow)
        }
        BroadcastCommand::Cancel { id } => {
            let view = client.cancel(&id).await?;
            println!("{}", progress_line(&view));
            return Ok(());
        }
    };
    if follow {
        match client.follow(&id, &mut out).await? {
            Ending::Completed => {}
            Ending::NotCompleted(status) => anyhow::bail!("broadcast {id} ended {status}"),
        }
    }
    Ok(())
}

/// Drops null members, so absent options are absent from the request (the API refuses
/// nulls in a segment).
fn strip_nulls(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
        map.values_mut().for_each(strip_nulls);
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
