//! Templates at run time (issue 13): versions stored in PostgreSQL overlay the files in
//! `templates/`, which stay the defaults and the reviewed path. A template is named by its
//! event type (a routed one, or `_adhoc`), locale (`ko`, `en`) and part (`email_subject`,
//! `email_text`, `email_html`, `slack`, `in_app_title`, `in_app_body`).
//!
//! - `GET /api/v1/templates/{eventType}/{locale}/{part}` (`templates:read`): the versions,
//!   newest first, the file as version 0, which one is in effect, and the activations.
//! - `PUT /api/v1/templates/{eventType}/{locale}/{part}` `{"source": "..."}`
//!   (`templates:write`) → 201: stored as the next version and put in effect, only if it
//!   passes [`check_version`] (else 422 `template_invalid`, nothing stored). At most
//!   [`MAX_SOURCE_BYTES`] (413 beyond).
//! - `POST /api/v1/templates/{eventType}/{locale}/{part}/versions/{version}/activate`
//!   (`templates:write`) → 200: rolls back or forward; version 0 is the file.
//! - `POST /api/v1/templates/{eventType}/preview` `{"locale"?, "data"?, "channels"?,
//!   "subject"?, "body"?}` (`templates:read`) → 200: every part of each channel rendered
//!   with the templates in effect, nothing sent; `data` is checked against the schema
//!   (400 with the paths).
//!
//! A change applies at once on the instance that made it and within
//! HERALD_TEMPLATES_REFRESH_MS plus one reload on every other (`templates::store`).

use axum::{
    Json,
    extract::State,
    http::{Method, StatusCode, header},
    response::{IntoResponse, Response},
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    auth::{Need, Rules, guarded},
    error::{
        ApiError, ApiJson, ApiPath, BadRequest, NotFound, Unprocessable, UnsupportedMediaType,
    },
    notifications::parse_channels,
};
use crate::{
    auth::{Principal, Scope},
    domain::{Channel, EventType, Locale},
    templates::{
        ADHOC, Part, RenderError,
        check::{MAX_SOURCE_BYTES, Refusal, Sample, check_version, context, schema_of},
        store::{self, TemplateKey},
    },
};

/// How many activations a listing shows.
const ACTIVATIONS_SHOWN: i64 = 20;

/// The template routes: reading and previewing need `templates:read` (or
/// `templates:write`), storing and activating `templates:write`.
pub fn router() -> OpenApiRouter<AppState> {
    // Whoever may change a template may also read and preview what they change.
    const READERS: &[Scope] = &[Scope::TemplatesRead, Scope::TemplatesWrite];
    const EDIT: Rules = &[
        (Method::GET, Need::AnyScope(READERS)),
        (Method::PUT, Need::Scope(Scope::TemplatesWrite)),
        (Method::POST, Need::Scope(Scope::TemplatesWrite)),
    ];
    const PREVIEW: Rules = &[(Method::POST, Need::AnyScope(READERS))];
    let edit = OpenApiRouter::new()
        .routes(routes!(list, store_version))
        .routes(routes!(activate));
    guarded(edit, EDIT).merge(guarded(
        OpenApiRouter::new().routes(routes!(preview)),
        PREVIEW,
    ))
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        ApiError::Unprocessable {
            code: "template_invalid",
            message: refusal.to_string(),
        }
    }
}

fn render_refusal(error: RenderError) -> ApiError {
    Refusal::from(error).into()
}

/// The event type's folder, if it has templates: a routed event type, or `_adhoc`.
fn folder(state: &AppState, event_type: &str) -> Result<String, ApiError> {
    let routed = EventType::parse(event_type)
        .ok()
        .is_some_and(|t| state.routing.event_types().contains(&t));
    if routed || event_type == ADHOC {
        Ok(event_type.to_owned())
    } else {
        Err(ApiError::NotFound(format!(
            "no templates for {event_type:?}: give a routed event type or {ADHOC}"
        )))
    }
}

fn locale(text: &str) -> Result<Locale, ApiError> {
    [Locale::Ko, Locale::En]
        .into_iter()
        .find(|l| l.as_str() == text)
        .ok_or_else(|| ApiError::NotFound(format!("no locale {text:?} (ko or en)")))
}

fn key(
    state: &AppState,
    (event_type, locale_text, part): (String, String, String),
) -> Result<TemplateKey, ApiError> {
    let event_type = folder(state, &event_type)?;
    let locale = locale(&locale_text)?;
    let part = Part::from_name(&part).ok_or_else(|| {
        let parts: Vec<&str> = Part::ALL.iter().map(|p| p.name()).collect();
        ApiError::NotFound(format!("no template part {part:?} ({})", parts.join(", ")))
    })?;
    Ok(TemplateKey {
        event_type,
        locale,
        part,
    })
}

/// What names a template in its path, as documented (the handlers read it as a tuple for
/// [`key`], which answers 404 for a name that is not a template's).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(dead_code, reason = "declared for the document")]
struct TemplatePath {
    /// A routed event type, or `_adhoc`.
    #[param(rename = "eventType")]
    event_type: String,
    locale: Locale,
    /// `email_subject`, `email_text`, `email_html`, `slack`, `in_app_title` or `in_app_body`.
    part: String,
}

/// One version in a listing; version 0 is the file.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TemplateVersion)]
struct VersionView {
    version: i32,
    /// `api` or `file`.
    origin: &'static str,
    created_by: Option<String>,
    created_at: Option<DateTime<Utc>>,
    active: bool,
    /// `None` for a file that does not exist (the default locale's renders instead).
    source: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TemplateActivation)]
struct ActivationView {
    version: i32,
    activated_by: String,
    activated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TemplateVersions)]
struct Listing {
    event_type: String,
    locale: Locale,
    part: &'static str,
    template: String,
    active_version: i32,
    activated_by: Option<String>,
    activated_at: Option<DateTime<Utc>>,
    versions: Vec<VersionView>,
    activations: Vec<ActivationView>,
}

async fn listing(state: &AppState, key: &TemplateKey) -> Result<Listing, ApiError> {
    let active = store::active(&state.db, key).await?;
    let active_version = active.as_ref().and_then(|a| a.version).unwrap_or(0);
    let mut versions: Vec<VersionView> = store::versions(&state.db, key)
        .await?
        .into_iter()
        .map(|v| VersionView {
            active: v.version == active_version,
            version: v.version,
            origin: "api",
            created_by: Some(v.created_by),
            created_at: Some(v.created_at),
            source: Some(v.source),
        })
        .collect();
    versions.push(VersionView {
        version: 0,
        origin: "file",
        created_by: None,
        created_at: None,
        active: active_version == 0,
        source: state
            .templates
            .file_source(key.locale, &key.event_type, key.part),
    });
    let activations = store::activations(&state.db, key, ACTIVATIONS_SHOWN)
        .await?
        .into_iter()
        .map(|a| ActivationView {
            version: a.version,
            activated_by: a.activated_by,
            activated_at: a.activated_at,
        })
        .collect();
    Ok(Listing {
        event_type: key.event_type.clone(),
        locale: key.locale,
        part: key.part.name(),
        template: key.name(),
        active_version,
        activated_by: active.as_ref().map(|a| a.activated_by.clone()),
        activated_at: active.map(|a| a.activated_at),
        versions,
        activations,
    })
}

/// A template's versions, newest first (the file as version 0), which one is in effect,
/// and the latest activations.
#[utoipa::path(
    get,
    path = "/api/v1/templates/{eventType}/{locale}/{part}",
    operation_id = "listTemplateVersions",
    tag = "templates",
    params(TemplatePath),
    responses(
        (status = 200, description = "The template.", body = Listing),
        (status = 404, response = NotFound),
    )
)]
async fn list(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<(String, String, String)>,
) -> Result<Json<Listing>, ApiError> {
    let key = key(&state, path)?;
    Ok(Json(listing(&state, &key).await?))
}

/// A new version.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewTemplateVersion)]
struct NewVersion {
    source: String,
}

/// The 201 answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = StoredTemplateVersion)]
struct Stored {
    template: String,
    version: i32,
    created_by: String,
    created_at: DateTime<Utc>,
    active: bool,
}

/// Stores a template version and puts it in effect, only if it reads no field its event
/// type's schema does not declare and renders with the schema's minimal and full payloads.
#[utoipa::path(
    put,
    path = "/api/v1/templates/{eventType}/{locale}/{part}",
    operation_id = "storeTemplateVersion",
    tag = "templates",
    params(TemplatePath),
    request_body = NewVersion,
    responses(
        (status = 201, description = "Stored and in effect.", body = Stored,
            headers(("Location" = String, description = "The template's URL."))),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
    )
)]
async fn store_version(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(path): ApiPath<(String, String, String)>,
    ApiJson(request): ApiJson<NewVersion>,
) -> Result<Response, ApiError> {
    let key = key(&state, path)?;
    if request.source.len() > MAX_SOURCE_BYTES {
        return Err(ApiError::PayloadTooLarge(format!(
            "a template may hold at most {} KiB",
            MAX_SOURCE_BYTES / 1024
        )));
    }
    check(&state, &key, &request.source)?;
    let stored = store::create(&state.db, &key, &request.source, &principal.name()).await?;
    apply_now(&state).await;
    let location = format!(
        "/api/v1/templates/{}/{}/{}",
        key.event_type,
        key.locale,
        key.part.name()
    );
    let body = Stored {
        template: key.name(),
        version: stored.version,
        created_by: stored.created_by,
        created_at: stored.created_at,
        active: true,
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response())
}

fn check(state: &AppState, key: &TemplateKey, source: &str) -> Result<(), ApiError> {
    let schema = schema_of(&state.schemas, &key.event_type).ok_or_else(|| {
        anyhow::anyhow!(
            "no schema for {}, though startup requires one",
            key.event_type
        )
    })?;
    check_version(
        &state.templates,
        schema,
        key.locale,
        &key.event_type,
        key.part,
        source,
    )?;
    Ok(())
}

/// Applies a change on this instance at once; the others poll for it. If this read fails,
/// this instance's poll applies it like the others'.
async fn apply_now(state: &AppState) {
    if let Err(error) = store::refresh(&state.db, &state.templates).await {
        tracing::warn!(
            error = format!("{error:#}"),
            "cannot apply a template change at once; the next poll will"
        );
    }
}

/// Puts a stored version (or the file, version 0) in effect again: a rollback or
/// roll-forward.
#[utoipa::path(
    post,
    path = "/api/v1/templates/{eventType}/{locale}/{part}/versions/{version}/activate",
    operation_id = "activateTemplateVersion",
    tag = "templates",
    params(
        TemplatePath,
        ("version" = i32, Path, description = "The version; 0 is the file.", minimum = 0),
    ),
    responses(
        (status = 200, description = "The template.", body = Listing),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 422, response = Unprocessable),
    )
)]
async fn activate(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((event_type, locale, part, version)): ApiPath<(String, String, String, String)>,
) -> Result<Json<Listing>, ApiError> {
    let key = key(&state, (event_type, locale, part))?;
    let version: i32 = version
        .parse()
        .ok()
        .filter(|v| *v >= 0)
        .ok_or_else(|| ApiError::BadRequest(format!("{version:?} is not a version number")))?;
    let not_found = || ApiError::NotFound(format!("{} has no version {version}", key.name()));
    let target = if version == 0 {
        None
    } else {
        // Checked again: the schema may have changed since the version was stored.
        let stored = store::version(&state.db, &key, version)
            .await?
            .ok_or_else(not_found)?;
        check(&state, &key, &stored.source)?;
        Some(version)
    };
    if !store::activate(&state.db, &key, target, &principal.name()).await? {
        return Err(not_found());
    }
    apply_now(&state).await;
    Ok(Json(listing(&state, &key).await?))
}

/// A preview request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = TemplatePreviewRequest)]
struct PreviewRequest {
    /// `ko` or `en`; the default locale when absent.
    locale: Option<String>,
    #[serde(default)]
    data: Map<String, Value>,
    /// Default: the event type's routed channels (for `_adhoc`: EMAIL, SLACK, IN_APP).
    channels: Option<Vec<String>>,
    /// For `_adhoc`.
    subject: Option<String>,
    /// For `_adhoc`.
    body: Option<String>,
}

/// Every part of a notification as rendered, nothing sent.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TemplatePreview)]
struct Preview {
    event_type: String,
    locale: Locale,
    /// By channel: EMAIL `{subject, text, html}`; SLACK the Block Kit message; IN_APP, SMS,
    /// KAKAOTALK, PUSH `{title, body}`.
    #[schema(value_type = BTreeMap<String, Object>)]
    channels: Map<String, Value>,
}

/// Renders every part of each channel with the templates in effect, nothing sent; `data`
/// is checked against the event type's schema.
#[utoipa::path(
    post,
    path = "/api/v1/templates/{eventType}/preview",
    operation_id = "previewTemplates",
    tag = "templates",
    params(("eventType" = String, Path, description = "A routed event type, or `_adhoc`.")),
    request_body = PreviewRequest,
    responses(
        (status = 200, description = "The rendered parts.", body = Preview),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
    )
)]
async fn preview(
    State(state): State<AppState>,
    ApiPath(event_type): ApiPath<String>,
    ApiJson(request): ApiJson<PreviewRequest>,
) -> Result<Json<Preview>, ApiError> {
    let folder = folder(&state, &event_type)?;
    let locale = match &request.locale {
        Some(text) => text.parse::<Locale>().map_err(ApiError::BadRequest)?,
        None => state.routing.default_locale(),
    };
    let channels = match &request.channels {
        Some(names) => parse_channels(names)?,
        None if folder == ADHOC => vec![Channel::Email, Channel::Slack, Channel::InApp],
        None => EventType::parse(&folder)
            .ok()
            .and_then(|t| state.routing.channels_in_any_domain(&t).map(<[_]>::to_vec))
            .unwrap_or_default(),
    };
    let schema = schema_of(&state.schemas, &folder)
        .ok_or_else(|| anyhow::anyhow!("no schema for {folder}, though startup requires one"))?;
    let data = Value::Object(request.data);
    schema.check(&data)?;
    let mut sample = Sample::default();
    if let Some(subject) = request.subject {
        sample.subject = subject;
    }
    if let Some(body) = request.body {
        sample.body = body;
    }
    let context = context(locale, &folder, &data, &sample);
    let templates = &state.templates;
    let mut rendered = Map::new();
    for channel in channels {
        if !templates.covers(&folder, channel) {
            return Err(ApiError::BadRequest(format!(
                "there is no {channel} template for {folder}"
            )));
        }
        let content = match channel {
            Channel::Email => {
                let email = templates
                    .email(locale, &folder, &context)
                    .map_err(render_refusal)?;
                json!({ "subject": email.subject, "text": email.text, "html": email.html })
            }
            Channel::Slack => templates
                .slack(locale, &folder, &context)
                .map_err(render_refusal)?,
            _ => {
                let short = templates
                    .short(locale, &folder, &context)
                    .map_err(render_refusal)?;
                json!({ "title": short.title, "body": short.body })
            }
        };
        rendered.insert(channel.to_string(), content);
    }
    Ok(Json(Preview {
        event_type: folder,
        locale,
        channels: rendered,
    }))
}
