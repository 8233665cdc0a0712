use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{EmailAddress, Locale, PhoneNumber};

/// The business area an event comes from. Picks the upstream topic, the consumer group
/// and the dead-letter topic.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    Payment,
    Subscription,
    Order,
    /// Notifications taken in over HTTP.
    Api,
}

impl Domain {
    /// The domains fed by upstream Kafka topics.
    pub const CONSUMED: [Domain; 3] = [Domain::Payment, Domain::Subscription, Domain::Order];

    pub fn as_str(self) -> &'static str {
        match self {
            Domain::Payment => "payment",
            Domain::Subscription => "subscription",
            Domain::Order => "order",
            Domain::Api => "api",
        }
    }

    /// The upstream topic, without prefix (`None` for the HTTP intake).
    pub fn source_topic(self) -> Option<&'static str> {
        match self {
            Domain::Payment => Some("fluxpay.payment.events"),
            Domain::Subscription => Some("fluxpay.subscription.events"),
            Domain::Order => Some("fluxpay.order.events"),
            Domain::Api => None,
        }
    }

    /// The consumer group, without prefix.
    pub fn consumer_group(self) -> &'static str {
        match self {
            Domain::Payment => "notif-payment",
            Domain::Subscription => "notif-subscription",
            Domain::Order => "notif-order",
            Domain::Api => "api",
        }
    }

    /// The dead-letter topic, without prefix (DESIGN §4).
    pub fn dlq_topic(self) -> String {
        format!("notification.dlq.{}", self.as_str())
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Domain {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "payment" => Ok(Domain::Payment),
            "subscription" => Ok(Domain::Subscription),
            "order" => Ok(Domain::Order),
            "api" => Ok(Domain::Api),
            _ => Err(format!(
                "unknown domain {s:?} (expected payment, subscription, order or api)"
            )),
        }
    }
}

/// The producer's unique id of an event: the idempotency key. 1 to 128 printable
/// characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
pub struct EventId(String);

impl EventId {
    pub fn parse(input: &str) -> Result<Self, String> {
        let id = input.trim();
        if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
            return Err(format!(
                "eventId must be 1 to 128 printable characters, got {input:?}"
            ));
        }
        Ok(EventId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An event type name such as `PAYMENT_FAILED`: upper-case letters, digits and `_`. Whether
/// Herald knows it is the routing table's call.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(try_from = "String")]
pub struct EventType(String);

impl EventType {
    pub fn parse(input: &str) -> Result<Self, String> {
        let valid = !input.is_empty()
            && input.len() <= 64
            && input.starts_with(|c: char| c.is_ascii_uppercase())
            && input
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if valid {
            Ok(EventType(input.to_owned()))
        } else {
            Err(format!(
                "eventType must be upper-case letters, digits and _ such as PAYMENT_FAILED, got {input:?}"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EventType {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        EventType::parse(&value)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user of the upstream services: a positive integer.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(try_from = "i64")]
pub struct UserId(i64);

impl TryFrom<i64> for UserId {
    type Error = String;

    fn try_from(id: i64) -> Result<Self, Self::Error> {
        UserId::new(id)
    }
}

impl UserId {
    pub fn new(id: i64) -> Result<Self, String> {
        if id > 0 {
            Ok(UserId(id))
        } else {
            Err(format!("userId must be a positive integer, got {id}"))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where to reach the user, as the event or request gives it. Each field overrides the
/// user directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recipient {
    pub email: Option<EmailAddress>,
    pub phone: Option<PhoneNumber>,
    pub locale: Option<Locale>,
}

/// An upstream event, decoded and checked (DESIGN §2).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: EventId,
    pub event_type: EventType,
    pub occurred_at: DateTime<Utc>,
    pub user_id: UserId,
    pub recipient: Recipient,
    /// Template data; a JSON object.
    pub data: Map<String, Value>,
}
