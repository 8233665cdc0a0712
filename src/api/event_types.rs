//! The published data contract of each event type (`schemas/{EVENT_TYPE}.json`), for the
//! upstream teams that send them:
//!
//! - `GET /api/v1/event-types`: every event type Herald takes, with its domain, topic,
//!   default channels and required fields.
//! - `GET /api/v1/event-types/{type}`: one of them with its JSON Schema, an example and the
//!   locales its templates exist in.
//!
//! Readable with `notifications:read` or `notifications:write`: a service that publishes
//! events needs the contract as much as one that reads history.

use std::collections::BTreeMap;

use axum::{Json, extract::State, http::Method};
use serde::Serialize;
use serde_json::Value;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    auth::{Need, Rules, guarded},
    error::{ApiError, ApiPath, NotFound},
};
use crate::{
    auth::Scope,
    domain::{Channel, Domain, Locale},
    event_schemas::{ADHOC_SCHEMA, EventSchema},
    templates::{ADHOC, Part},
};

/// The event-type routes.
pub fn router() -> OpenApiRouter<AppState> {
    const READERS: &[Scope] = &[Scope::NotificationsRead, Scope::NotificationsWrite];
    const RULES: Rules = &[(Method::GET, Need::AnyScope(READERS))];
    guarded(
        OpenApiRouter::new()
            .routes(routes!(list))
            .routes(routes!(read)),
        RULES,
    )
}

/// One event type in the list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = EventTypeSummary)]
struct Summary {
    event_type: String,
    description: String,
    /// `payment`, `subscription`, `order`, or `api` for the HTTP intake only.
    domain: Domain,
    /// The Kafka topic to publish it on, without `HERALD_TOPIC_PREFIX`; absent for the
    /// HTTP intake only.
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'static str>,
    /// The channels it goes to by default; empty where the caller names them.
    channels: Vec<Channel>,
    required: Vec<String>,
    optional: Vec<String>,
}

/// One event type in full.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = EventTypeDetail)]
struct Detail {
    #[serde(flatten)]
    summary: Summary,
    /// The JSON Schema (draft 2020-12) of the event's `data`.
    schema: Value,
    /// A realistic `data` object.
    example: Value,
    /// A whole envelope with that example, ready to publish.
    example_event: Value,
    /// For each locale, the template parts it has; a part a locale lacks is rendered in
    /// the default locale.
    templates: BTreeMap<Locale, Vec<&'static str>>,
    default_locale: Locale,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = EventTypeList)]
struct List {
    items: Vec<Summary>,
}

/// Every event type Herald takes, with its domain, topic, default channels and required
/// fields.
#[utoipa::path(
    get,
    path = "/api/v1/event-types",
    operation_id = "listEventTypes",
    tag = "event-types",
    responses((status = 200, description = "The event types.", body = List))
)]
async fn list(State(state): State<AppState>) -> Json<List> {
    let mut items: Vec<Summary> = state
        .routing
        .routes()
        .into_iter()
        .filter_map(|(domain, event_type, channels)| {
            let schema = state.schemas.get(event_type.as_str())?;
            Some(summary(schema, domain, channels))
        })
        .collect();
    if let Some(adhoc) = state.schemas.get(ADHOC_SCHEMA) {
        items.push(summary(adhoc, Domain::Api, &[]));
    }
    Json(List { items })
}

/// One event type with its JSON Schema (draft 2020-12), an example, and the locales its
/// templates exist in.
#[utoipa::path(
    get,
    path = "/api/v1/event-types/{eventType}",
    operation_id = "getEventType",
    tag = "event-types",
    params(("eventType" = String, Path, description = "The event type, such as `PAYMENT_COMPLETED`.")),
    responses(
        (status = 200, description = "The event type.", body = Detail),
        (status = 404, response = NotFound),
    )
)]
async fn read(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Detail>, ApiError> {
    let not_found = || {
        ApiError::NotFound(format!(
            "no event type {name}; GET /api/v1/event-types lists them"
        ))
    };
    let schema = state.schemas.get(&name).ok_or_else(not_found)?;
    let (domain, channels, folder) = if name == ADHOC_SCHEMA {
        (Domain::Api, &[][..], ADHOC)
    } else {
        let (domain, _, channels) = state
            .routing
            .routes()
            .into_iter()
            .find(|(_, t, _)| t.as_str() == name)
            .ok_or_else(not_found)?;
        (domain, channels, name.as_str())
    };
    let templates = [Locale::Ko, Locale::En]
        .into_iter()
        .map(|locale| {
            let parts = Part::ALL
                .into_iter()
                .filter(|part| state.templates.has_own(locale, folder, *part))
                .map(Part::name)
                .collect();
            (locale, parts)
        })
        .collect();
    let example = schema.example().clone();
    let example_event = serde_json::json!({
        "eventId": "3f6c8a0e-5b1d-4a51-9d8e-0c2f4b7a9e10",
        "eventType": name,
        "occurredAt": "2026-11-21T09:30:00Z",
        "userId": 42,
        "data": example,
    });
    Ok(Json(Detail {
        summary: summary(schema, domain, channels),
        schema: schema.document().clone(),
        example,
        example_event,
        templates,
        default_locale: state.routing.default_locale(),
    }))
}

fn summary(schema: &EventSchema, domain: Domain, channels: &[Channel]) -> Summary {
    let required = schema.required();
    Summary {
        event_type: schema.name().to_owned(),
        description: schema.description().to_owned(),
        domain,
        topic: domain.source_topic(),
        channels: channels.to_vec(),
        optional: schema
            .fields()
            .filter(|f| !required.contains(f))
            .map(str::to_owned)
            .collect(),
        required: required.into_iter().map(str::to_owned).collect(),
    }
}
