//! SMS, KAKAOTALK and PUSH: one HTTP gateway implementation, configured per channel.
//!
//! Request: `POST {url}` with `Authorization: Bearer {key}` (when configured),
//! `Idempotency-Key: {deliveryId}` and the JSON body
//! `{"idempotencyKey", "channel", "to", "userId", "title", "text", "eventType",
//! "notificationId"}`. A 2xx answer may carry `{"messageId": "..."}`, kept as the
//! delivery's provider reference.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use url::Url;

use super::{
    Content, Outgoing, Receipt, SendError, SendFuture, Sender, bounded_text, http_client,
    http_failure, http_transport_failure,
};
use crate::domain::Channel;

/// One gateway endpoint.
pub struct GatewaySender {
    channel: Channel,
    client: reqwest::Client,
    url: Url,
    key: Option<SecretString>,
}

impl GatewaySender {
    pub fn new(
        channel: Channel,
        url: Url,
        key: Option<SecretString>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        Ok(GatewaySender {
            channel,
            client: http_client(timeout)?,
            url,
            key,
        })
    }
}

impl Sender for GatewaySender {
    fn send<'a>(&'a self, message: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(async move {
            let Content::Short(content) = &message.content else {
                return Err(SendError::permanent(
                    "template",
                    "a gateway needs a short text",
                ));
            };
            let id = message.delivery_id.to_string();
            let mut request = self
                .client
                .post(self.url.clone())
                .header("Idempotency-Key", &id)
                .json(&json!({
                    "idempotencyKey": id,
                    "channel": self.channel,
                    "to": message.address,
                    "userId": message.user_id,
                    "title": content.title,
                    "text": content.body,
                    "eventType": message.event_type,
                    "notificationId": message.notification_id,
                }));
            if let Some(key) = &self.key {
                request = request.bearer_auth(key.expose_secret());
            }
            let response = request
                .send()
                .await
                .map_err(|e| http_transport_failure(&e.without_url()))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .cloned();
            let text = bounded_text(response).await;
            if !status.is_success() {
                return Err(http_failure(status, retry_after.as_ref(), &text));
            }
            let provider_ref = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["messageId"].as_str().map(super::provider_text));
            Ok(Receipt { provider_ref })
        })
    }
}
