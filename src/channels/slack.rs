//! SLACK: the rendered Block Kit message, POSTed to the ops incoming webhook.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::{
    Content, Outgoing, Receipt, SendError, SendFuture, Sender, bounded_text, http_client,
    http_failure, http_transport_failure,
};

/// Posts to one Slack incoming webhook.
pub struct SlackSender {
    client: reqwest::Client,
    webhook: SecretString,
}

impl SlackSender {
    pub fn new(webhook: SecretString, timeout: Duration) -> anyhow::Result<Self> {
        Ok(SlackSender {
            client: http_client(timeout)?,
            webhook,
        })
    }

    /// Posts a plain-text operator message (an alert, say), with the same failure
    /// classification as a delivery's send.
    pub async fn post_text(&self, text: &str) -> Result<(), SendError> {
        self.post(
            self.client
                .post(self.webhook.expose_secret())
                .json(&serde_json::json!({ "text": text })),
        )
        .await
    }

    /// Sends a request to the webhook and classifies its answer (retryable or not).
    async fn post(&self, request: reqwest::RequestBuilder) -> Result<(), SendError> {
        let response = request
            .send()
            .await
            .map_err(|e| http_transport_failure(&e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .cloned();
        let text = bounded_text(response).await;
        Err(http_failure(status, retry_after.as_ref(), &text))
    }
}

impl Sender for SlackSender {
    fn send<'a>(&'a self, message: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(async move {
            let Content::Slack(body) = &message.content else {
                return Err(SendError::permanent(
                    "template",
                    "SLACK needs a Slack message",
                ));
            };
            let request = self
                .client
                .post(self.webhook.expose_secret())
                // Slack ignores it; a proxy or test double can dedupe on it.
                .header("X-Herald-Delivery-Id", message.delivery_id.to_string())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            self.post(request).await.map(|()| Receipt::default())
        })
    }
}
