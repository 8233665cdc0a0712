//! Decoding an upstream message into an [`Event`], or saying exactly why it is poison.
//!
//! Poison is the message's own fault and never improves on retry, so it goes to the
//! dead-letter topic at once with its [`PoisonClass`] in `X-Error-Class`.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::domain::{EmailAddress, Event, EventId, EventType, PhoneNumber, Recipient, UserId};

/// Why a message is poison; the `X-Error-Class` header of its dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonClass {
    /// Larger than the configured limit.
    Oversize,
    /// Not UTF-8, not JSON, or not a JSON object.
    Decode,
    /// A required field is absent or null.
    MissingField,
    /// A field has the wrong type or a bad value.
    InvalidField,
    /// No route exists for the event type in this domain.
    UnknownEventType,
    /// `data` breaks the event type's schema (`schemas/{EVENT_TYPE}.json`).
    SchemaViolation,
}

impl PoisonClass {
    pub fn as_str(self) -> &'static str {
        match self {
            PoisonClass::Oversize => "oversize",
            PoisonClass::Decode => "decode",
            PoisonClass::MissingField => "missing_field",
            PoisonClass::InvalidField => "invalid_field",
            PoisonClass::UnknownEventType => "unknown_event_type",
            PoisonClass::SchemaViolation => "schema_violation",
        }
    }
}

/// A message that cannot become a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    pub class: PoisonClass,
    pub message: String,
    /// The eventId, when the message had a readable one (for `X-Event-Id`).
    pub event_id: Option<String>,
}

impl Poison {
    fn new(class: PoisonClass, message: impl Into<String>) -> Self {
        Poison {
            class,
            message: message.into(),
            event_id: None,
        }
    }
}

/// Decodes one message value. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Event, Poison> {
    if bytes.len() > max_bytes {
        return Err(Poison::new(
            PoisonClass::Oversize,
            format!(
                "message is {} bytes, over the {max_bytes}-byte limit",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Poison::new(PoisonClass::Decode, format!("message is not UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Poison::new(PoisonClass::Decode, format!("message is not JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(Poison::new(
            PoisonClass::Decode,
            "message is JSON but not an object",
        ));
    };
    if object
        .iter()
        .any(|(k, v)| k.contains('\0') || contains_nul(v))
    {
        return Err(Poison::new(
            PoisonClass::InvalidField,
            "message contains a NUL character (\\u0000), which cannot be stored",
        ));
    }
    let event_id = object
        .get("eventId")
        .and_then(Value::as_str)
        .map(str::to_owned);
    decode_object(object).map_err(|mut poison| {
        poison.event_id = event_id;
        poison
    })
}

/// PostgreSQL text and jsonb cannot hold U+0000; such a message could never be stored.
pub fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

fn decode_object(mut object: Map<String, Value>) -> Result<Event, Poison> {
    let event_id = EventId::parse(required_str(&object, "eventId")?).map_err(invalid)?;
    let event_type = EventType::parse(required_str(&object, "eventType")?).map_err(invalid)?;
    let occurred_at = DateTime::parse_from_rfc3339(required_str(&object, "occurredAt")?)
        .map_err(|e| invalid(format!("occurredAt is not an RFC 3339 timestamp: {e}")))?
        .with_timezone(&Utc);
    let user_id = match required(&object, "userId")? {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| invalid(format!("userId must be a positive integer, got {n}")))
            .and_then(|id| UserId::new(id).map_err(invalid))?,
        other => return Err(wrong_type("userId", "a positive integer", other)),
    };
    let recipient = match object.get("recipient") {
        None | Some(Value::Null) => Recipient::default(),
        Some(Value::Object(recipient)) => decode_recipient(recipient)?,
        Some(other) => return Err(wrong_type("recipient", "an object", other)),
    };
    let data = match object.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(data)) => data,
        Some(other) => return Err(wrong_type("data", "an object", &other)),
    };
    Ok(Event {
        event_id,
        event_type,
        occurred_at,
        user_id,
        recipient,
        data,
    })
}

fn decode_recipient(recipient: &Map<String, Value>) -> Result<Recipient, Poison> {
    let text = |field: &str| match recipient.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(wrong_type(&format!("recipient.{field}"), "a string", other)),
    };
    Ok(Recipient {
        email: text("email")?
            .map(|e| EmailAddress::parse(e).map_err(|m| invalid(format!("recipient.email: {m}"))))
            .transpose()?,
        phone: text("phone")?
            .map(|p| PhoneNumber::parse(p).map_err(|m| invalid(format!("recipient.phone: {m}"))))
            .transpose()?,
        // A language Herald has no templates for falls back to the default one: the
        // notification is still worth sending.
        locale: text("locale")?.and_then(|l| l.parse().ok()),
    })
}

fn required<'a>(object: &'a Map<String, Value>, field: &str) -> Result<&'a Value, Poison> {
    match object.get(field) {
        None | Some(Value::Null) => Err(Poison::new(
            PoisonClass::MissingField,
            format!("required field {field} is missing"),
        )),
        Some(value) => Ok(value),
    }
}

fn required_str<'a>(object: &'a Map<String, Value>, field: &str) -> Result<&'a str, Poison> {
    match required(object, field)? {
        Value::String(s) => Ok(s),
        other => Err(wrong_type(field, "a string", other)),
    }
}

fn invalid(message: impl Into<String>) -> Poison {
    Poison::new(PoisonClass::InvalidField, message)
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> Poison {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    invalid(format!("{field} must be {expected}, got {kind}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::Locale;

    const LIMIT: usize = 64 * 1024;

    fn envelope() -> Value {
        json!({
            "eventId": "3f6c8a0e-1",
            "eventType": "PAYMENT_FAILED",
            "occurredAt": "2026-11-21T09:30:00Z",
            "userId": 42,
            "recipient": { "email": "a@b.co", "phone": "+821012345678", "locale": "ko-KR" },
            "data": { "orderId": "o-1", "amount": 12000 }
        })
    }

    fn poison_of(value: Value) -> Poison {
        decode(value.to_string().as_bytes(), LIMIT).expect_err("poison")
    }

    #[test]
    fn a_complete_envelope_decodes() {
        let event = decode(envelope().to_string().as_bytes(), LIMIT).unwrap();

        assert_eq!(event.event_id.as_str(), "3f6c8a0e-1");
        assert_eq!(event.event_type.as_str(), "PAYMENT_FAILED");
        assert_eq!(event.user_id.get(), 42);
        assert_eq!(event.recipient.email.unwrap().as_str(), "a@b.co");
        assert_eq!(event.recipient.locale, Some(Locale::Ko));
        assert_eq!(event.data["amount"], 12000);
    }

    #[test]
    fn each_kind_of_bad_message_has_its_class() {
        let mut no_id = envelope();
        no_id.as_object_mut().unwrap().remove("eventId");
        let mut negative = envelope();
        negative["userId"] = json!(-5);
        let mut huge = envelope();
        huge["userId"] = json!(18446744073709551615u64);
        let mut string_user = envelope();
        string_user["userId"] = json!("42");
        let mut bad_time = envelope();
        bad_time["occurredAt"] = json!("yesterday");
        let mut bad_email = envelope();
        bad_email["recipient"]["email"] = json!("not-an-email");
        let mut bad_data = envelope();
        bad_data["data"] = json!([1, 2]);
        let mut lower_type = envelope();
        lower_type["eventType"] = json!("payment_failed");

        let cases = [
            (no_id, PoisonClass::MissingField),
            (negative, PoisonClass::InvalidField),
            (huge, PoisonClass::InvalidField),
            (string_user, PoisonClass::InvalidField),
            (bad_time, PoisonClass::InvalidField),
            (bad_email, PoisonClass::InvalidField),
            (bad_data, PoisonClass::InvalidField),
            (lower_type, PoisonClass::InvalidField),
            (json!([1]), PoisonClass::Decode),
        ];
        for (value, class) in cases {
            assert_eq!(poison_of(value.clone()).class, class, "{value}");
        }
    }

    #[test]
    fn bytes_that_are_not_json_or_not_utf8_are_decode_errors() {
        for bytes in [&b"{not json"[..], &[0xff, 0xfe, 0x00][..], b""] {
            assert_eq!(decode(bytes, LIMIT).unwrap_err().class, PoisonClass::Decode);
        }
    }

    #[test]
    fn oversize_and_deeply_nested_messages_are_poison_not_panics() {
        let big = vec![b' '; LIMIT + 1];
        assert_eq!(
            decode(&big, LIMIT).unwrap_err().class,
            PoisonClass::Oversize
        );

        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            decode(deep.as_bytes(), LIMIT).unwrap_err().class,
            PoisonClass::Decode
        );
    }

    #[test]
    fn a_nul_character_anywhere_is_poison() {
        let mut bad = envelope();
        bad["data"]["note"] = json!({ "deep": ["a\u{0}b"] });

        assert_eq!(poison_of(bad).class, PoisonClass::InvalidField);
    }

    #[test]
    fn poison_keeps_a_readable_event_id() {
        let mut bad = envelope();
        bad["userId"] = json!(0);

        assert_eq!(poison_of(bad).event_id.as_deref(), Some("3f6c8a0e-1"));
    }

    #[test]
    fn an_unsupported_locale_falls_back_instead_of_failing() {
        let mut french = envelope();
        french["recipient"]["locale"] = json!("fr");

        let event = decode(french.to_string().as_bytes(), LIMIT).unwrap();

        assert_eq!(event.recipient.locale, None);
    }
}

#[cfg(test)]
mod properties {
    //! Hostile input: whatever the bytes, the decoder answers with an event or a poison
    //! class, and never panics.
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::{PoisonClass, decode};

    const LIMIT: usize = 64 * 1024;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(".{0,12}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&bytes, LIMIT);
        }

        #[test]
        fn arbitrary_json_is_an_event_or_poison(value in json_value()) {
            let _ = decode(value.to_string().as_bytes(), LIMIT);
        }

        #[test]
        fn wrong_types_in_any_envelope_field_are_invalid_or_missing(
            field in prop::sample::select(vec!["eventId", "eventType", "occurredAt", "userId", "recipient", "data"]),
            value in json_value(),
        ) {
            let mut envelope = json!({
                "eventId": "e-1",
                "eventType": "ORDER_SHIPPED",
                "occurredAt": "2026-11-21T09:30:00Z",
                "userId": 7,
                "recipient": { "email": "a@b.co" },
                "data": {}
            });
            envelope[field] = value;
            match decode(envelope.to_string().as_bytes(), LIMIT) {
                Ok(event) => prop_assert_eq!(event.user_id.get() > 0, true),
                Err(poison) => prop_assert!(matches!(
                    poison.class,
                    PoisonClass::InvalidField | PoisonClass::MissingField
                ), "{:?}", poison),
            }
        }

        #[test]
        fn any_data_object_of_a_valid_envelope_decodes(data in prop::collection::btree_map("[a-zA-Z]{1,10}", json_value(), 0..6)) {
            let data: serde_json::Map<String, Value> = data.into_iter().collect();
            let nul = data.values().any(super::contains_nul);
            let envelope = json!({
                "eventId": "e-1",
                "eventType": "ORDER_SHIPPED",
                "occurredAt": "2026-11-21T09:30:00Z",
                "userId": 7,
                "data": data
            });
            let decoded = decode(envelope.to_string().as_bytes(), LIMIT);
            prop_assert_eq!(decoded.is_ok(), !nul);
        }
    }
}
