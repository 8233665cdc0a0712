//! The `herald` binary as a person or an orchestrator runs it.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use crate::helpers::{create_database, stack_settings, unique_topic_prefix};

fn herald() -> Command {
    Command::new(env!("CARGO_BIN_EXE_herald"))
}

/// Runs `herald serve` with one variable overridden; returns (exit success, stderr).
fn serve_with(variable: &str, value: &str) -> (bool, String) {
    let output = herald()
        .arg("serve")
        .env(variable, value)
        .output()
        .expect("the binary runs");
    (
        output.status.success(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn help_explains_every_subcommand() {
    let output = herald().arg("--help").output().unwrap();

    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for subcommand in ["serve", "migrate", "topics", "demo"] {
        assert!(
            help.contains(subcommand),
            "{subcommand} missing from:\n{help}"
        );
    }
    let serve_help = herald().args(["serve", "--help"]).output().unwrap();
    let serve_help = String::from_utf8(serve_help.stdout).unwrap();
    assert!(serve_help.contains("--roles"), "{serve_help}");
    assert!(serve_help.contains("dispatch"), "{serve_help}");
}

#[test]
fn a_bad_kafka_broker_list_stops_startup_with_one_line_naming_the_variable() {
    let (ok, stderr) = serve_with("HERALD_KAFKA_BROKERS", "not a broker list");

    assert!(!ok);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("HERALD_KAFKA_BROKERS"), "{stderr}");
    assert!(stderr.contains("host:port"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_bad_http_address_stops_startup_with_one_line_naming_the_variable() {
    let (ok, stderr) = serve_with("HERALD_HTTP_ADDR", "localhost-8080");

    assert!(!ok);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("HERALD_HTTP_ADDR"), "{stderr}");
    assert!(stderr.contains("\"localhost-8080\""), "{stderr}");
}

#[test]
fn a_bad_database_url_is_reported_without_echoing_its_password() {
    let (ok, stderr) = serve_with("HERALD_DATABASE_URL", "mysql://herald:hunter2@db/herald");

    assert!(!ok);
    assert!(stderr.contains("HERALD_DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn an_unknown_role_is_refused_with_the_list_of_roles() {
    let output = herald()
        .args(["serve", "--roles", "api,mailer"])
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("mailer"), "{stderr}");
    assert!(stderr.contains("projector"), "{stderr}");
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn serve_then_stop_with(signal: &str) {
    let settings = stack_settings();
    let (_, db_url) = create_database(&settings).await;
    let port = free_port();
    let mut child = herald()
        .args(["serve", "--roles", "api"])
        .env("HERALD_DATABASE_URL", &db_url)
        .env("HERALD_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("HERALD_TOPIC_PREFIX", unique_topic_prefix())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/health/live");
    let mut live = false;
    for _ in 0..300 {
        if let Ok(response) = client.get(&url).send().await {
            live = response.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(live, "herald serve did not come up on port {port}");

    let sent = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());

    let mut status = None;
    for _ in 0..300 {
        if let Some(exited) = child.try_wait().unwrap() {
            status = Some(exited);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(status) = status else {
        child.kill().unwrap();
        panic!("herald serve did not exit within 30 s of SIG{signal}");
    };
    assert!(status.success(), "exit status after SIG{signal}: {status}");
    assert!(client.get(&url).send().await.is_err(), "the port is closed");
}

#[tokio::test]
async fn serve_exits_0_on_sigterm() {
    serve_then_stop_with("TERM").await;
}

#[tokio::test]
async fn serve_exits_0_on_sigint() {
    serve_then_stop_with("INT").await;
}

#[tokio::test]
async fn demo_publishes_the_seed_scenarios_and_they_become_notifications() {
    let app = crate::helpers::spawn_front_half(|s| {
        s.channels.slack_webhook_url = Some("http://127.0.0.1:9/ops".to_owned().into());
    })
    .await;
    let addr = app.address.trim_start_matches("http://").to_owned();

    let output = tokio::task::spawn_blocking({
        let prefix = app.settings.kafka.topic_prefix.clone();
        move || {
            herald()
                .arg("demo")
                .env("HERALD_TOPIC_PREFIX", prefix)
                .env("HERALD_HTTP_ADDR", addr)
                .env("HERALD_ADMIN_TOKEN", crate::helpers::ADMIN_TOKEN)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for event_type in [
        "ORDER_COMPLETED",
        "PAYMENT_FAILED",
        "SUBSCRIPTION_RENEWED",
        "SUBSCRIPTION_EXPIRING",
        "SYSTEM_INCIDENT",
    ] {
        assert!(
            stdout.contains(event_type),
            "{event_type} missing from:\n{stdout}"
        );
    }
    crate::helpers::wait_until(30, "the five demo notifications exist", || async {
        app.notification_count().await == 5
    })
    .await;
    let channels: Vec<(String, String)> = sqlx::query_as(
        "SELECT n.event_type, string_agg(d.channel || ':' || d.status, ',' ORDER BY d.channel) \
         FROM notifications n JOIN deliveries d ON d.notification_id = n.id \
         GROUP BY n.event_type ORDER BY n.event_type",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(
        channels,
        [
            ("ORDER_COMPLETED", "EMAIL:PENDING"),
            (
                "PAYMENT_FAILED",
                "EMAIL:PENDING,IN_APP:PENDING,SLACK:PENDING"
            ),
            ("SUBSCRIPTION_EXPIRING", "EMAIL:PENDING,IN_APP:PENDING"),
            ("SUBSCRIPTION_RENEWED", "EMAIL:PENDING"),
            ("SYSTEM_INCIDENT", "SLACK:PENDING"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
}

/// Runs a herald command against the app's database; returns its stdout, or panics with
/// its stderr.
async fn herald_against(app: &crate::helpers::TestApp, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let db_url = app.settings.database_url().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        herald()
            .args(&args)
            .env("HERALD_DATABASE_URL", db_url)
            .env(
                "HERALD_USER_TOKEN_SECRET",
                crate::helpers::USER_TOKEN_SECRET,
            )
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn keys_made_listed_and_revoked_on_the_command_line_work_against_the_api() {
    let app = crate::helpers::spawn_app().await;
    let created = herald_against(
        &app,
        &[
            "keys",
            "create",
            "--name",
            "grafana",
            "--scopes",
            "dashboard:read",
        ],
    )
    .await;
    let field = |name: &str| {
        created
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in:\n{created}"))
            .trim()
            .to_owned()
    };
    let (id, key) = (field("id "), field("key "));
    assert!(key.starts_with("hrk_"), "{created}");
    let dashboard = |key: String| {
        let app = &app;
        async move {
            app.anonymous
                .get(format!(
                    "{}/api/v1/dashboard/delivery/channels",
                    app.address
                ))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(dashboard(key.clone()).await, 200);

    let listed = herald_against(&app, &["keys", "list"]).await;
    assert!(
        listed.contains("grafana") && listed.contains(&id),
        "{listed}"
    );
    assert!(!listed.contains(&key), "a listing never shows a key");

    herald_against(&app, &["keys", "revoke", &id]).await;
    crate::helpers::wait_until(5, "the revoked key is refused", || async {
        dashboard(key.clone()).await == 401
    })
    .await;
}

#[tokio::test]
async fn users_token_prints_a_token_for_that_users_own_routes() {
    let app = crate::helpers::spawn_app().await;
    let token = herald_against(&app, &["users", "token", "7", "--ttl", "10m"]).await;
    let inbox = |user: i64| {
        let (app, token) = (&app, token.trim().to_owned());
        async move {
            app.anonymous
                .get(format!("{}/api/v1/users/{user}/inbox", app.address))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(inbox(7).await, 200);
    assert_eq!(inbox(8).await, 403);
}
