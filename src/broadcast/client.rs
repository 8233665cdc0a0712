//! `herald broadcast`: create, follow and cancel broadcasts through the HTTP API, with a
//! progress bar on a terminal and one line every few seconds elsewhere (logs, CI).

use std::{
    io::{IsTerminal, Write},
    time::Duration,
};

use anyhow::{Context, bail};
use reqwest::header::{self, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

/// How often `--follow` polls.
const POLL: Duration = Duration::from_millis(500);
/// How often a line is printed when stdout is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);
const BAR_WIDTH: usize = 30;

/// A client of one Herald API.
pub struct Client {
    base: String,
    http: reqwest::Client,
}

/// Whether a followed broadcast ended well.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    Completed,
    /// FAILED or CANCELLED.
    NotCompleted(String),
}

impl Client {
    /// A client of the API at `base` that sends `credential` (an API key or the admin
    /// token) with every request.
    pub fn new(base: &str, credential: &SecretString) -> anyhow::Result<Self> {
        let mut bearer =
            HeaderValue::from_str(&format!("Bearer {}", credential.expose_secret().trim()))
                .context("the credential is not a valid header value")?;
        bearer.set_sensitive(true);
        Ok(Client {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .default_headers(HeaderMap::from_iter([(header::AUTHORIZATION, bearer)]))
                .build()
                .context("Failed to build the HTTP client")?,
        })
    }

    /// POST /api/v1/broadcasts; returns the broadcast as created.
    pub async fn create(
        &self,
        request: &Value,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut post = self
            .http
            .post(format!("{}/api/v1/broadcasts", self.base))
            .json(request);
        if let Some(key) = idempotency_key {
            post = post.header("Idempotency-Key", key);
        }
        answer(post.send().await).await
    }

    /// GET /api/v1/broadcasts/{id}.
    pub async fn get(&self, id: &str) -> anyhow::Result<Value> {
        answer(
            self.http
                .get(format!("{}/api/v1/broadcasts/{id}", self.base))
                .send()
                .await,
        )
        .await
    }

    /// POST /api/v1/broadcasts/{id}/cancel.
    pub async fn cancel(&self, id: &str) -> anyhow::Result<Value> {
        answer(
            self.http
                .post(format!("{}/api/v1/broadcasts/{id}/cancel", self.base))
                .json(&json!({}))
                .send()
                .await,
        )
        .await
    }

    /// Polls until the broadcast ends, drawing its progress on `out`.
    pub async fn follow(&self, id: &str, out: &mut impl Write) -> anyhow::Result<Ending> {
        let terminal = std::io::stdout().is_terminal();
        let mut last_line = tokio::time::Instant::now() - LOG_EVERY;
        let mut last_status = String::new();
        let mut failures = 0;
        loop {
            // A restart of the API (or a blip) does not end the follow; a lasting outage does.
            let view = match self.get(id).await {
                Ok(view) => {
                    failures = 0;
                    view
                }
                Err(error) if failures < 20 => {
                    failures += 1;
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "cannot read the broadcast; retrying"
                    );
                    tokio::time::sleep(POLL * 2).await;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let status = view["status"].as_str().unwrap_or("?").to_owned();
            let finished = matches!(status.as_str(), "COMPLETED" | "FAILED" | "CANCELLED");
            if terminal {
                write!(out, "\r{}\x1b[K", progress_line(&view))?;
            } else if finished || status != last_status || last_line.elapsed() >= LOG_EVERY {
                writeln!(out, "{}", progress_line(&view))?;
                last_line = tokio::time::Instant::now();
            }
            out.flush()?;
            last_status = status.clone();
            if finished {
                if terminal {
                    writeln!(out)?;
                }
                writeln!(out, "{}", summary(&view))?;
                return Ok(match status.as_str() {
                    "COMPLETED" => Ending::Completed,
                    other => Ending::NotCompleted(other.to_owned()),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The body of a 2xx answer, or an error carrying the API's message.
async fn answer(response: reqwest::Result<reqwest::Response>) -> anyhow::Result<Value> {
    let response =
        response.context("Herald's API did not answer (is `herald serve` running? see --api)")?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("the API answered {status}: {message}");
    }
    Ok(body)
}

/// `[#########-----]  42.3%  RUNNING  sent 1200  failed 0  skipped 3  pending 200  ...`
pub fn progress_line(view: &Value) -> String {
    let progress = view["progress"].as_f64().unwrap_or(0.0).clamp(0.0, 100.0);
    let filled = ((progress / 100.0) * BAR_WIDTH as f64).round() as usize;
    let totals = &view["totals"];
    let n = |key: &str| totals[key].as_i64().unwrap_or(0);
    let rate = view["timings"]["recipientsPerSecond"]
        .as_f64()
        .map(|r| format!("  {r:.0} recipients/s"))
        .unwrap_or_default();
    format!(
        "[{}{}] {progress:5.1}%  {:<9}  recipients {}/{}  sent {}  failed {}  skipped {}  pending {}{rate}",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled),
        view["status"].as_str().unwrap_or("?"),
        n("created"),
        n("audience"),
        n("sent"),
        n("failed"),
        n("skipped"),
        n("pending"),
    )
}

/// The closing line of a followed broadcast.
fn summary(view: &Value) -> String {
    let elapsed = view["timings"]["elapsedSecs"]
        .as_f64()
        .map(|s| format!(" in {s:.1} s"))
        .unwrap_or_default();
    format!(
        "broadcast {} {}{elapsed}: {} recipients, {} deliveries sent, {} failed, {} skipped",
        view["broadcastId"].as_str().unwrap_or("?"),
        view["status"].as_str().unwrap_or("?"),
        view["totals"]["audience"],
        view["totals"]["sent"],
        view["totals"]["failed"],
        view["totals"]["skipped"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_draws_a_bar_and_the_totals() {
        let view = json!({
            "status": "RUNNING", "progress": 50.0,
            "totals": {"audience": 10, "created": 6, "sent": 10, "failed": 0, "skipped": 0, "pending": 2},
            "timings": {"recipientsPerSecond": 123.4},
        });
        let line = progress_line(&view);
        assert!(
            line.starts_with(&format!("[{}{}]", "#".repeat(15), "-".repeat(15))),
            "{line}"
        );
        assert!(line.contains(" 50.0%  RUNNING"), "{line}");
        assert!(line.contains("recipients 6/10  sent 10"), "{line}");
        assert!(line.ends_with("123 recipients/s"), "{line}");
    }
}
