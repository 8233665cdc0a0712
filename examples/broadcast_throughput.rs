//! Measures broadcasts on the local stack: imports N users, broadcasts to all of them on
//! the given channels, and reports recipients/s for the fan-out (every notification
//! written) and to completion (every delivery final).
//!
//! ```sh
//! eval "$(scripts/stack.sh env bench | sed 's/^/export /')"
//! cargo run --release --example broadcast_throughput -- 100000 IN_APP
//! cargo run --release --example broadcast_throughput -- 15000 EMAIL,IN_APP
//! ```

use std::time::{Duration, Instant};

use herald::{roles::Role, startup::Application};
use serde_json::{Value, json};

// The benchmark's isolated run (its own database, topics and Redis prefix).
#[allow(dead_code)]
#[path = "bench/run.rs"]
mod run;

/// Users per import request.
const IMPORT_CHUNK: usize = 20_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let users: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(100_000);
    let channels: Vec<String> = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "IN_APP".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    herald::telemetry::init_tracing(herald::telemetry::LogFormat::Text);
    let mut settings = run::Run::new(&herald::config::Settings::load()?, "bcast")
        .await?
        .settings;
    settings.http.addr = "127.0.0.1:0".parse()?;
    // Every /api/v1 route needs a credential: this run's own admin token.
    let token = format!("bcast-{}", uuid::Uuid::new_v4().simple());
    settings.admin.token = Some(token.clone().into());
    let app = Application::build(settings, &[Role::Api, Role::Dispatch, Role::Relay]).await?;
    let api = format!("http://{}", app.local_addr());
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    let http = reqwest::Client::builder()
        .default_headers(reqwest::header::HeaderMap::from_iter([(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse()?,
        )]))
        .build()?;

    let started = Instant::now();
    let ids: Vec<usize> = (1..=users).collect();
    for chunk in ids.chunks(IMPORT_CHUNK) {
        let body: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"userId": id, "email": format!("u{id}@bench.example.com"), "tags": ["bench"]}))
            .collect();
        let report: Value = http
            .post(format!("{api}/api/v1/users:import"))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(report["imported"] == chunk.len(), "import failed: {report}");
    }
    println!(
        "import: {users} users in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let created: Value = http
        .post(format!("{api}/api/v1/broadcasts"))
        .json(
            &json!({"audience": {"segment": {"tags": ["bench"]}}, "channels": channels,
                      "subject": "Benchmark", "body": "A broadcast benchmark."}),
        )
        .send()
        .await?
        .json()
        .await?;
    let id = created["broadcastId"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no broadcast: {created}"))?
        .to_owned();
    let started = Instant::now();
    let mut fanned_out = None;
    let view = loop {
        let view: Value = http
            .get(format!("{api}/api/v1/broadcasts/{id}"))
            .send()
            .await?
            .json()
            .await?;
        if fanned_out.is_none() && view["timings"]["fannedOutAt"].is_string() {
            fanned_out = Some(started.elapsed());
        }
        if view["status"] != "RUNNING" && view["status"] != "SCHEDULED" {
            break view;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(3600), "timed out");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let took = started.elapsed();
    let fanned_out = fanned_out.unwrap_or(took);
    println!(
        "broadcast {users} recipients on {}: {} in {:.1} s = {:.0} recipients/s to completion; fan-out {:.1} s = {:.0} recipients/s; totals {}",
        channels.join("+"),
        view["status"],
        took.as_secs_f64(),
        users as f64 / took.as_secs_f64(),
        fanned_out.as_secs_f64(),
        users as f64 / fanned_out.as_secs_f64(),
        view["totals"],
    );
    shutdown.cancel();
    server.await??;
    Ok(())
}
