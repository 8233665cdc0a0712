//! `GET /api-docs/openapi.json` (the OpenAPI 3.1 document) and `GET /docs` (Swagger UI).
//!
//! The document is derived from the code: each handler declares its operation with
//! `#[utoipa::path]` and is routed with `utoipa_axum::routes!`, so a route and its
//! documentation are one declaration; request and response types derive `ToSchema`, so a
//! field added to a type is in the document without editing it. The security of each
//! operation is written from the same rules that enforce it ([`super::auth::guarded`]).
//! Only the prose (descriptions, tags) is written by hand, in the attributes. At serve time
//! the data schema of each event type (`schemas/`) is added to its components as
//! `EventData_{EVENT_TYPE}`, so the document shows the schemas this instance enforces.
//! The shared error responses carry examples built the way the handlers build the bodies
//! (`error.rs`). `tests/api/docs.rs` checks the document against the public route list,
//! calls every operation, validates it with openapi-spec-validator, checks real answers of
//! the main operations against the schemas it declares (no property it does not name), and
//! compares error examples with real answers.
//!
//! Swagger UI's page, script and stylesheet are Herald's own: `utoipa-swagger-ui` with its
//! `vendored` feature embeds a pinned Swagger UI (5.32.6, from the
//! `utoipa-swagger-ui-vendored` crate) at build time, so the page renders on a machine or
//! network that reaches no CDN, and the build itself downloads nothing.

use std::sync::LazyLock;

use axum::{Json, Router, extract::State};
use serde_json::Value;
use utoipa::{
    Modify, OpenApi,
    openapi::{
        PathItem, Ref, RefOr,
        path::Operation,
        security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};
use utoipa_axum::{router::OpenApiRouter, routes};
use utoipa_swagger_ui::{Config, SwaggerUi};

use super::{AppState, error};

/// The security scheme of API keys and the admin token (with the scope each operation needs).
pub const API_KEY: &str = "apiKey";
/// The security scheme of end-user tokens, on a user's own routes.
pub const USER_TOKEN: &str = "userToken";
/// The security scheme of signed provider receipts.
pub const RECEIPT_SIGNATURE: &str = "receiptSignature";

/// What the document says besides its operations: info, tags, security schemes, the shared
/// error responses, and the docs page (served by Swagger UI's router, not a handler here).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald",
        description = "Herald turns business events into notifications and delivers them by Email, Slack, In-App and HTTP gateways (SMS, KakaoTalk, push). Upstream services publish events to Kafka or call the HTTP intake (`POST /api/v1/notifications`); Herald stores each accepted notification with one delivery per channel in PostgreSQL, sends them in the background with retries, rate limits and circuit breakers, and dead-letters what cannot be delivered. This API also serves a user's history, channel preferences, contact details and in-app inbox, delivery statistics for analysts, and the dead-letter admin API for operators.\n\nEvery JSON field name is camelCase. Every error answers with the body `{\"error\": {\"code\": \"...\", \"message\": \"...\"}}`, where `code` is machine-readable (`invalid_request`, `schema_violation`, `unauthorized`, `forbidden`, `not_found`, `conflict`, `payload_too_large`, `unsupported_media_type`, `idempotency_key_reused`, `template_invalid`, `unavailable`, `overloaded`, `timeout`, `internal`) and `message` is for a person. Request bodies are limited to 256 KiB. Every route under `/api/v1` needs a credential (`Authorization: Bearer ...`): an API key holding the scope the operation lists under `security` (the bootstrap `HERALD_ADMIN_TOKEN` holds every scope), or on a user's own routes an end-user token. Without a valid one the answer is 401 with `WWW-Authenticate: Bearer`; a valid one without the scope gets 403. `Idempotency-Key` is scoped to the credential that sent it and remembered for `HERALD_IDEMPOTENCY_TTL` (24 h). Health, metrics and these docs are open."
    ),
    tags(
        (name = "notifications", description = "The HTTP intake, one notification with its deliveries, and a user's history."),
        (name = "event-types", description = "The data contract of each event type: which `data` fields it needs (JSON Schema, draft 2020-12), its Kafka topic and default channels, an example, and its templates' locales. An event whose `data` breaks its schema is refused at the edge: dead-lettered at ingest with `X-Error-Class: schema_violation` and the path in `X-Error-Message`, or answered 400 `schema_violation` by the HTTP intake and broadcasts. Fields a schema does not declare are accepted and passed to the templates. The schemas are also in this document's components, as `EventData_{EVENT_TYPE}`."),
        (name = "preferences", description = "A user's channel preferences, per channel and per event type."),
        (name = "users", description = "The user directory: where to reach a user (email, phone, locale, time zone), targeting attributes (birth year, tags), and the bulk import."),
        (name = "broadcasts", description = "One message to an audience (user ids or a segment of the directory), fanned out in the background through the ordinary delivery pipeline, with progress and a completion event on notification.broadcast.events."),
        (name = "inbox", description = "A user's in-app messages, their read state, and a live Server-Sent Events stream."),
        (name = "dashboard", description = "Delivery statistics for analysts, from the read model."),
        (name = "admin", description = "Dead-letter administration for operators (scope `dlq:admin`), and API keys (scope `keys:admin`). Actions record who did them: the name of the credential."),
        (name = "templates", description = "Templates at run time: versions stored through the API overlay the files in templates/ (the defaults, and the reviewed path). A version is stored only if it reads no field its event type's schema does not declare and renders with the schema's minimal and full payloads; it applies at once on the instance that stored it and on every other within 5 s. Reading and previewing need `templates:read`; storing and activating `templates:write`."),
        (name = "operations", description = "Liveness, readiness, Prometheus metrics and this documentation. Served by every instance, whatever its roles."),
        (name = "receipts", description = "What providers say became of a message after accepting it (delivered, undelivered, bounced), and the addresses suppressed after a permanent failure."),
        (name = "webhooks", description = "Signed outbound webhooks for services that do not read Kafka: each call is `POST {url}` with the body `{\"type\", \"timestamp\", \"data\"}` (data: the event as its topic carries it), signed the Standard Webhooks way with the endpoint's secret (headers webhook-id, webhook-timestamp, webhook-signature). A call not answered 2xx is retried with backoff for 24 h, then dead-lettered to the operators; an endpoint whose every call failed for 24 h is disabled and reported.")
    ),
    paths(docs_page),
    components(
        schemas(error::ErrorBody),
        responses(
            error::BadRequest,
            error::Unauthorized,
            error::Forbidden,
            error::NotFound,
            error::Conflict,
            error::PayloadTooLarge,
            error::UnsupportedMediaType,
            error::Unprocessable,
            error::TooManyRequests,
            error::Unavailable,
            error::Internal,
        )
    ),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

/// The credentials of DESIGN §5a.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            API_KEY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key (`herald keys create` or `POST /api/v1/admin/keys`), or the bootstrap `HERALD_ADMIN_TOKEN`, which holds every scope: `Authorization: Bearer <key>`. The scope each operation needs is listed in its `security` requirement. Missing, malformed, unknown or revoked: 401 with `WWW-Authenticate: Bearer`; valid but without the scope: 403."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            USER_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An end-user token: a JWT signed HS256 with `HERALD_USER_TOKEN_SECRET`, claims `sub` (the user id as a string) and `exp` (required). Accepted only on the user's own history, inbox, unread count, read marks, in-app stream (also as `?token=`) and preferences; another user's routes or any other route: 403. Another algorithm (`none` included), a wrong signature or an expired token: 401."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            RECEIPT_SIGNATURE,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "webhook-signature",
                "Provider receipts carry no API key: each is signed the Standard Webhooks way (https://www.standardwebhooks.com) with the channel's receipt secret (`HERALD_SMS_RECEIPT_SECRET`, `HERALD_KAKAOTALK_RECEIPT_SECRET`, `HERALD_PUSH_RECEIPT_SECRET`, `HERALD_EMAIL_BOUNCE_SECRET`, each `whsec_<base64>`): headers `webhook-id` (unique per receipt; a repeat is refused 409), `webhook-timestamp` (Unix seconds, within 5 minutes of now) and `webhook-signature` (`v1,<base64 of HMAC-SHA256(secret, \"{id}.{timestamp}.{body}\")>`). Missing, wrong or stale: 401.",
            ))),
        );
    }
}

/// Adds a reusable response (`components.responses`) to an operation, unless it already
/// documents that status.
pub fn respond(operation: &mut Operation, status: u16, response: &str) {
    operation
        .responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| RefOr::Ref(Ref::from_response_name(response)));
}

/// The operations of a path item.
pub fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .flatten()
}

/// The documentation routes.
pub fn router() -> OpenApiRouter<AppState> {
    // `/docs` redirects to `/docs/`, which serves the page and its assets.
    let page: Router<AppState> = SwaggerUi::new("/docs")
        .config(Config::from("/api-docs/openapi.json"))
        .into();
    OpenApiRouter::new()
        .routes(routes!(openapi))
        .merge(page.into())
}

/// The Swagger UI page: `/docs` redirects to `/docs/`, which renders this document.
#[utoipa::path(
    get,
    path = "/docs",
    operation_id = "getDocs",
    tag = "operations",
    responses((status = 303, description = "To `/docs/`, the page (HTML) and its assets."))
)]
#[expect(
    dead_code,
    reason = "served by Swagger UI's router; declared for the document"
)]
fn docs_page() {}

/// The document as derived from the code, once per process.
static DOCUMENT: LazyLock<Value> = LazyLock::new(|| {
    serde_json::to_value(super::openapi()).expect("the OpenAPI document serializes")
});

/// This OpenAPI 3.1 document, with the data schema of each event type this instance
/// enforces as `EventData_{EVENT_TYPE}`.
#[utoipa::path(
    get,
    path = "/api-docs/openapi.json",
    operation_id = "getOpenApi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI document.", body = Object))
)]
async fn openapi(State(state): State<AppState>) -> Json<Value> {
    let mut document = DOCUMENT.clone();
    if let Some(components) = document["components"]["schemas"].as_object_mut() {
        for schema in state.schemas.iter() {
            let mut published = schema.document().clone();
            if let Some(fields) = published.as_object_mut() {
                // The document is one resource: ids of its own would make resolvers
                // look for the schemas elsewhere.
                fields.remove("$id");
                fields.remove("$schema");
            }
            components.insert(format!("EventData_{}", schema.name()), published);
        }
    }
    Json(document)
}
