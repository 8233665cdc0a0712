//! Channel strategies: one [`Sender`] per channel, chosen by the dispatcher. A send either
//! returns a [`Receipt`] or a [`SendError`] that says whether trying again can help; the
//! dispatcher decides retries on that alone.
//!
//! The HTTP channels (Slack, gateways) share [`http_client`] and [`bounded_text`]: redirects
//! are not followed and at most [`MAX_RESPONSE_BYTES`] of an answer is read, because the
//! receiver is a third party whose answers Herald does not control.

pub mod email;
pub mod gateway;
pub mod in_app;
pub mod in_app_hub;
pub mod slack;

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc, time::Duration};

use uuid::Uuid;

use crate::{
    domain::{Channel, Locale},
    templates::{EmailContent, ShortContent},
};

/// What a channel sends, already rendered.
#[derive(Debug, Clone)]
pub enum Content {
    Email(EmailContent),
    /// Block Kit JSON, as [`crate::templates::Templates::slack_body`] checked it.
    Slack(String),
    Short(ShortContent),
}

/// One message ready to go out.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub delivery_id: Uuid,
    pub notification_id: Uuid,
    pub user_id: Option<i64>,
    pub event_type: String,
    pub locale: Locale,
    /// Email address, phone number, `user:{id}` or `ops`.
    pub address: String,
    pub content: Content,
}

/// Proof of a send.
#[derive(Debug, Clone, Default)]
pub struct Receipt {
    /// The provider's message id, when it gives one.
    pub provider_ref: Option<String>,
}

/// Whether a failure may pass if the send is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Connection, timeout, SMTP 4xx, HTTP 408/429/5xx.
    Retryable,
    /// SMTP 5xx, HTTP 4xx, a bad address or template.
    Permanent,
}

/// A failed send.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    pub retry: Retry,
    /// Short machine-readable cause (`X-Error-Class` of a dead letter): `smtp_transient`,
    /// `smtp_permanent`, `http_5xx`, `http_4xx`, `rate_limited`, `timeout`, `connect`...
    pub class: &'static str,
    pub message: String,
    /// The provider asked to wait at least this long (HTTP Retry-After).
    pub retry_after: Option<Duration>,
}

/// Most bytes of a webhook's or gateway's answer that are read: ample for an error message
/// or a message id, and a bound on what a misbehaving provider can make Herald hold.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The client of the HTTP channels: the send timeout, and no redirects. A redirect would
/// carry the message (and a gateway's key, on a same-host redirect) to an address nobody
/// configured; it answers as a permanent failure instead (see [`http_failure`]).
pub fn http_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// The start of a response's body, at most [`MAX_RESPONSE_BYTES`], read chunk by chunk:
/// the rest is never read (dropping the response closes its connection). A body that
/// breaks off gives what arrived.
pub async fn bounded_text(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < MAX_RESPONSE_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_RESPONSE_BYTES - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// Longest provider text kept (error messages, message ids).
const MAX_PROVIDER_TEXT: usize = 500;
/// Longest Retry-After honoured; a provider asking for more is treated as down.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Makes text from a provider safe to store: no NUL (PostgreSQL refuses it, which would
/// keep a sent delivery from being recorded) and bounded in length.
pub fn provider_text(text: &str) -> String {
    text.chars()
        .filter(|c| *c != '\0')
        .take(MAX_PROVIDER_TEXT)
        .collect()
}

impl SendError {
    pub fn retryable(class: &'static str, message: impl Into<String>) -> Self {
        SendError {
            retry: Retry::Retryable,
            class,
            message: provider_text(&message.into()),
            retry_after: None,
        }
    }

    pub fn permanent(class: &'static str, message: impl Into<String>) -> Self {
        SendError {
            retry: Retry::Permanent,
            class,
            message: provider_text(&message.into()),
            retry_after: None,
        }
    }
}

/// The boxed future a [`Sender`] returns, so senders can live behind `dyn`.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<Receipt, SendError>> + Send + 'a>>;

/// One channel's way of sending.
pub trait Sender: Send + Sync {
    /// Sends one message. Must not take longer than the transport's own timeouts.
    fn send<'a>(&'a self, message: &'a Outgoing) -> SendFuture<'a>;
}

/// The configured senders; a channel without one is disabled.
pub type Senders = HashMap<Channel, Arc<dyn Sender>>;

/// Classifies an HTTP status from a webhook or gateway (DESIGN §3): 408, 429 and 5xx are
/// retryable, other 4xx permanent. Honours `Retry-After` (seconds) when given.
///
/// A 3xx is permanent (`http_redirect`): redirects are not followed, so the same URL will
/// answer the same way until an operator points the channel at the final address; the dead
/// letter can then be retried.
pub fn http_failure(
    status: reqwest::StatusCode,
    retry_after: Option<&reqwest::header::HeaderValue>,
    body: &str,
) -> SendError {
    let snippet: String = body.chars().take(200).collect();
    let message = format!("HTTP {status}: {snippet}");
    let retry_after = retry_after
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    let mut error = match status.as_u16() {
        429 => SendError::retryable("rate_limited", message),
        408 => SendError::retryable("timeout", message),
        500..=599 => SendError::retryable("http_5xx", message),
        300..=399 => SendError::permanent(
            "http_redirect",
            format!("HTTP {status}: redirects are not followed; configure the final URL"),
        ),
        _ => SendError::permanent("http_4xx", message),
    };
    error.retry_after = retry_after;
    error
}

/// Classifies a transport error from reqwest: all retryable (the request may not have
/// reached the provider, or its answer was lost).
pub fn http_transport_failure(error: &reqwest::Error) -> SendError {
    let class = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else {
        "transport"
    };
    SendError::retryable(class, format!("request failed: {error}"))
}

#[cfg(test)]
mod tests {
    use reqwest::{StatusCode, header::HeaderValue};

    use super::*;

    #[test]
    fn statuses_are_classified_as_design_section_three_says() {
        let class = |code: u16| http_failure(StatusCode::from_u16(code).unwrap(), None, "").retry;
        assert_eq!(class(500), Retry::Retryable);
        assert_eq!(class(503), Retry::Retryable);
        assert_eq!(class(429), Retry::Retryable);
        assert_eq!(class(408), Retry::Retryable);
        assert_eq!(class(400), Retry::Permanent);
        assert_eq!(class(404), Retry::Permanent);
        assert_eq!(class(301), Retry::Permanent);
        assert_eq!(class(307), Retry::Permanent);
        assert_eq!(
            http_failure(StatusCode::FOUND, None, "").class,
            "http_redirect"
        );
        let limited = http_failure(
            StatusCode::TOO_MANY_REQUESTS,
            Some(&HeaderValue::from_static("7")),
            "slow down",
        );
        assert_eq!(limited.retry_after, Some(Duration::from_secs(7)));
        let forever = http_failure(
            StatusCode::TOO_MANY_REQUESTS,
            Some(&HeaderValue::from_static("31536000")),
            "",
        );
        assert_eq!(forever.retry_after, Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn provider_text_loses_nul_characters_and_is_bounded() {
        let error = http_failure(StatusCode::BAD_GATEWAY, None, "bad\0gateway");
        assert!(!error.message.contains('\0'));
        assert_eq!(provider_text(&"x".repeat(10_000)).len(), MAX_PROVIDER_TEXT);
    }
}
