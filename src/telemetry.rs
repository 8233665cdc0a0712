//! Logs and metrics: a `tracing` subscriber (human-readable, or JSON with
//! `HERALD_LOG_FORMAT=json`) and the process-wide Prometheus recorder behind `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log filter used when `RUST_LOG` is unset.
const DEFAULT_FILTER: &str = "info,librdkafka=warn,sqlx=warn";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines for a terminal.
    Text,
    /// One JSON object per line for a log pipeline.
    Json,
}

impl LogFormat {
    /// Reads `HERALD_LOG_FORMAT` (`text`, the default, or `json`).
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("HERALD_LOG_FORMAT").ok().as_deref() {
            None | Some("") | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => Err(format!(
                "invalid HERALD_LOG_FORMAT: expected \"text\" or \"json\", got {other:?}"
            )),
        }
    }
}

/// Installs the global `tracing` subscriber, writing to stderr. `log` records (librdkafka's,
/// sqlx's) are bridged into it.
pub fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}

/// The process-wide Prometheus recorder, installed on first use. Several applications in one
/// process (the test suite) share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0,
                    ],
                )
                .expect("the bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed in this process")
        })
        .clone()
}
