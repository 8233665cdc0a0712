//! EMAIL: multipart text + HTML over pooled async SMTP (lettre). The Message-ID is derived
//! from the delivery id, so a receiver can drop a copy sent twice after a crash.

use std::time::Duration;

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{Mailbox, MultiPart},
    transport::smtp::{PoolConfig, authentication::Credentials},
};
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::{Content, Outgoing, Receipt, SendError, SendFuture, Sender};

/// Sends through one SMTP server.
pub struct EmailSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl EmailSender {
    /// `smtps://[user:pass@]host:port` (implicit TLS), `smtp://...?tls=required` (STARTTLS,
    /// refused if the server does not offer it) or `smtp://host:port` (plain, as for a local
    /// sink). The settings refuse credentials over plain SMTP unless explicitly allowed.
    pub fn new(
        url: &SecretString,
        from: &str,
        timeout: Duration,
        pool_size: u32,
    ) -> anyhow::Result<Self> {
        let url = Url::parse(url.expose_secret())?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let starttls = url
            .query_pairs()
            .any(|(k, v)| k == "tls" && v == "required");
        let mut builder = if url.scheme() == "smtps" {
            AsyncSmtpTransport::<Tokio1Executor>::relay(&host)?
        } else if starttls {
            AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&host)?
        } else {
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        };
        if let Some(port) = url.port() {
            builder = builder.port(port);
        }
        if !url.username().is_empty() {
            builder = builder.credentials(Credentials::new(
                url.username().to_owned(),
                url.password().unwrap_or_default().to_owned(),
            ));
        }
        let transport = builder
            .timeout(Some(timeout))
            .pool_config(PoolConfig::new().max_size(pool_size))
            .build();
        Ok(EmailSender {
            transport,
            from: from.parse()?,
        })
    }
}

impl Sender for EmailSender {
    fn send<'a>(&'a self, message: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(async move {
            let Content::Email(content) = &message.content else {
                return Err(SendError::permanent("template", "EMAIL needs an email"));
            };
            let to: Mailbox = message.address.parse().map_err(|e| {
                SendError::permanent(
                    "address",
                    format!("bad email address {:?}: {e}", message.address),
                )
            })?;
            let email = Message::builder()
                .from(self.from.clone())
                .to(to)
                .subject(&content.subject)
                .message_id(Some(format!("<{}@herald>", message.delivery_id)))
                .multipart(MultiPart::alternative_plain_html(
                    content.text.clone(),
                    content.html.clone(),
                ))
                .map_err(|e| {
                    SendError::permanent("message", format!("cannot build the email: {e}"))
                })?;
            self.transport.send(email).await.map_err(|e| {
                if e.is_permanent() {
                    SendError::permanent("smtp_permanent", format!("SMTP rejected the email: {e}"))
                } else if e.is_timeout() {
                    SendError::retryable("timeout", format!("SMTP timed out: {e}"))
                } else if e.is_transient() {
                    SendError::retryable("smtp_transient", format!("SMTP deferred the email: {e}"))
                } else {
                    SendError::retryable("connect", format!("SMTP failed: {e}"))
                }
            })?;
            Ok(Receipt::default())
        })
    }
}
