//! `herald demo`: publishes the seed scenarios' events to the upstream topics, the way an
//! upstream service would, so a person can watch them flow through Herald.

use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use rdkafka::producer::{FutureProducer, FutureRecord};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{config::Settings, kafka};

/// One sample event and the upstream topic it belongs to.
struct Sample {
    topic: &'static str,
    user_id: u64,
    envelope: Value,
}

fn samples() -> Vec<Sample> {
    let now = Utc::now().to_rfc3339();
    let event = |event_type: &str, user_id: u64, locale: &str, data: Value| {
        json!({
            "eventId": Uuid::new_v4().to_string(),
            "eventType": event_type,
            "occurredAt": now,
            "userId": user_id,
            "recipient": { "email": format!("user{user_id}@example.com"), "locale": locale },
            "data": data,
        })
    };
    vec![
        Sample {
            topic: "fluxpay.order.events",
            user_id: 1001,
            envelope: event(
                "ORDER_COMPLETED",
                1001,
                "en",
                json!({ "orderId": "o-1001", "amount": 42000, "currency": "KRW" }),
            ),
        },
        Sample {
            topic: "fluxpay.payment.events",
            user_id: 1002,
            envelope: event(
                "PAYMENT_FAILED",
                1002,
                "ko",
                json!({ "orderId": "o-1002", "amount": 12000, "currency": "KRW", "reason": "card declined" }),
            ),
        },
        Sample {
            topic: "fluxpay.subscription.events",
            user_id: 1003,
            envelope: event(
                "SUBSCRIPTION_RENEWED",
                1003,
                "ko",
                json!({ "subscriptionId": "s-1003", "plan": "Premium", "amount": 9900, "currency": "KRW" }),
            ),
        },
        Sample {
            topic: "fluxpay.subscription.events",
            user_id: 1004,
            envelope: event(
                "SUBSCRIPTION_EXPIRING",
                1004,
                "en",
                json!({ "subscriptionId": "s-1004", "plan": "Basic", "expiresAt": "2026-12-01T00:00:00Z" }),
            ),
        },
    ]
}

/// Publishes every sample and prints where each went.
pub async fn run(settings: &Settings) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka::client_config(&settings.kafka)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "15000")
        .create()
        .context("Failed to create the Kafka producer")?;
    for sample in samples() {
        let topic = format!("{}{}", settings.kafka.topic_prefix, sample.topic);
        let key = sample.user_id.to_string();
        let payload = serde_json::to_vec(&sample.envelope)?;
        let delivery = producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                Duration::from_secs(15),
            )
            .await
            .map_err(|(error, _)| error)
            .with_context(|| {
                format!("Failed to publish to {topic} (did `herald topics create` run?)")
            })?;
        println!(
            "published {} for user {} to {topic} [partition {}, offset {}]",
            sample.envelope["eventType"].as_str().unwrap_or_default(),
            sample.user_id,
            delivery.partition,
            delivery.offset,
        );
    }
    let api = api_base(settings);
    let incident = json!({
        "eventType": "SYSTEM_INCIDENT",
        "data": {
            "title": "Payment gateway latency above 2 s",
            "severity": "major",
            "service": "fluxpay-gateway",
            "description": "p99 latency of card authorisation is 2.4 s for the last 5 minutes."
        }
    });
    let token = settings
        .admin
        .token
        .as_ref()
        .context("HERALD_ADMIN_TOKEN is not set: the demo posts its incident with it")?;
    let response = reqwest::Client::new()
        .post(format!("{api}/api/v1/notifications"))
        .bearer_auth(token.expose_secret())
        .header("Idempotency-Key", Uuid::new_v4().to_string())
        .json(&incident)
        .send()
        .await
        .with_context(|| format!("Failed to reach Herald at {api} (is `make run` up?)"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "the HTTP intake answered {status}: {body}"
    );
    println!(
        "posted SYSTEM_INCIDENT to {api}/api/v1/notifications: notification {}",
        body["notificationId"].as_str().unwrap_or("?")
    );
    println!(
        "\nWhat to look at (send Authorization: Bearer $HERALD_ADMIN_TOKEN):\n  \
         GET {api}/api/v1/notifications/{} (the incident, SLACK to the ops channel)\n  \
         the user directory is not needed: each sample carries its recipient\n  \
         emails arrive in MailDev once deliveries are dispatched",
        body["notificationId"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// Where this machine reaches Herald's HTTP API.
fn api_base(settings: &Settings) -> String {
    let mut addr = settings.http.addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{event_schemas::EventSchemas, routing::RoutingTable};

    #[test]
    fn every_demo_event_is_routed_and_matches_its_schema() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let routing = RoutingTable::load(&root.join("config/routing.toml")).unwrap();
        let schemas = EventSchemas::load(&root.join("schemas"), routing.event_types()).unwrap();

        for sample in samples() {
            let event_type = sample.envelope["eventType"].as_str().unwrap();
            let data = sample.envelope["data"].as_object().unwrap();
            assert!(
                routing
                    .event_types()
                    .iter()
                    .any(|t| t.as_str() == event_type),
                "{event_type}"
            );
            schemas
                .check(event_type, data)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}
