//! The "fast local HTTP sink" Slack deliveries go to: answers 200 at once and counts.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use axum::{Router, extract::State, routing::post};

/// A running sink.
pub struct Sink {
    pub url: String,
    received: Arc<AtomicU64>,
}

impl Sink {
    /// Serves on a free loopback port in this process.
    pub async fn start() -> anyhow::Result<Self> {
        let received = Arc::new(AtomicU64::new(0));
        let app = Router::new()
            .route(
                "/slack",
                post(|State(n): State<Arc<AtomicU64>>| async move {
                    n.fetch_add(1, Ordering::Relaxed);
                    "ok"
                }),
            )
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/slack", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Sink { url, received })
    }

    /// Requests received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}
