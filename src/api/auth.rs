//! Who may call what (DESIGN §5a), in two steps:
//!
//! 1. [`authenticate`] runs on every request under `/api/`, before anything reads the
//!    request: without a valid credential the answer is 401 with `WWW-Authenticate:
//!    Bearer`, whatever the route, so an anonymous caller learns nothing else (not even
//!    which routes exist). The [`Principal`] goes into the request's extensions.
//! 2. [`authorize`] runs on each route with that route's [`Rules`]: the scope each method
//!    needs, and where a user token may stand in for it (the user's own routes). A
//!    method without a rule is refused, so a route added without one fails closed.
//!
//! Handlers take the [`Principal`] as an extractor for audit fields and idempotency.

use axum::{
    extract::{FromRequestParts, RawPathParams, Request, State},
    http::{HeaderMap, Method, header, request::Parts},
    middleware::{Next, from_fn_with_state},
    response::{IntoResponse, Response},
};
use utoipa::openapi::{PathItem, path::Operation, security::SecurityRequirement};
use utoipa_axum::router::OpenApiRouter;

use super::{
    AppState,
    docs::{self, API_KEY, USER_TOKEN},
    error::ApiError,
};
use crate::auth::{AuthFailure, Principal, Scope};

/// What one method of a route needs.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// A credential holding this scope (the admin token holds every scope).
    Scope(Scope),
    /// This scope, or a user token of the user the request is about.
    ScopeOrOwner(Scope, UserIn),
    /// Any one of these scopes (a contract both publishers and readers need).
    AnyScope(&'static [Scope]),
}

/// Where a route names the user it is about.
#[derive(Debug, Clone, Copy)]
pub enum UserIn {
    /// The `{id}` path parameter.
    Path,
    /// The `userId` query parameter.
    Query,
}

/// A route's rules: what each method it serves needs.
pub type Rules = &'static [(Method, Need)];

/// Serves `routes` behind `rules` ([`authorize`]) and writes the same rules into their
/// operations' `security`, with the 401 and 403 they answer: the document says what is
/// enforced because it is read from the same rules.
pub fn guarded(mut routes: OpenApiRouter<AppState>, rules: Rules) -> OpenApiRouter<AppState> {
    for item in routes.get_openapi_mut().paths.paths.values_mut() {
        for (method, need) in rules {
            if let Some(operation) = operation_mut(item, method) {
                operation.security = Some(requirements(*need));
                docs::respond(operation, 401, "Unauthorized");
                docs::respond(operation, 403, "Forbidden");
            }
        }
    }
    routes.route_layer(from_fn_with_state(rules, authorize))
}

/// The operation of a path item for an HTTP method.
fn operation_mut<'a>(item: &'a mut PathItem, method: &Method) -> Option<&'a mut Operation> {
    match *method {
        Method::GET => item.get.as_mut(),
        Method::POST => item.post.as_mut(),
        Method::PUT => item.put.as_mut(),
        Method::PATCH => item.patch.as_mut(),
        Method::DELETE => item.delete.as_mut(),
        _ => None,
    }
}

/// What a [`Need`] asks of a caller, as OpenAPI security requirements (any one will do).
fn requirements(need: Need) -> Vec<SecurityRequirement> {
    let key = |scope: Scope| SecurityRequirement::new(API_KEY, [scope.as_str()]);
    match need {
        Need::Scope(scope) => vec![key(scope)],
        Need::ScopeOrOwner(scope, _) => vec![
            key(scope),
            SecurityRequirement::new(USER_TOKEN, Vec::<String>::new()),
        ],
        Need::AnyScope(scopes) => scopes.iter().copied().map(key).collect(),
    }
}

/// Authenticates requests under `/api/` (see the module docs).
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    // Provider receipts carry no API key: each is signed with its channel's receipt secret,
    // which the route checks before reading anything (super::receipts).
    let path = request.uri().path();
    if !path.starts_with("/api/") || super::receipts::is_receipt_route(request.method(), path) {
        return next.run(request).await;
    }
    let presented = match credential(request.headers(), &request) {
        Ok(presented) => presented,
        Err(failure) => return refuse(failure),
    };
    match state.auth.authenticate(&presented).await {
        Ok(Ok(principal)) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Ok(Err(failure)) => refuse(failure),
        Err(unavailable) => {
            tracing::warn!(
                error = format!("{:#}", unavailable.0),
                "cannot check an API key"
            );
            ApiError::Unavailable("cannot check the credential now; try again".into())
                .into_response()
        }
    }
}

/// The bearer credential: `Authorization: Bearer ...`, or for the in-app stream only
/// (a browser's EventSource cannot set headers) `?token=`. The query string is never
/// logged: Herald logs routes by template.
fn credential(headers: &HeaderMap, request: &Request) -> Result<String, AuthFailure> {
    if let Some(bearer) = bearer(headers) {
        return bearer.map(str::to_owned);
    }
    if request.uri().path().ends_with("/inbox/stream")
        && let Some(token) = query_param(request.uri().query(), "token")
    {
        return Ok(token);
    }
    Err(AuthFailure::Missing)
}

/// The credential of an `Authorization: Bearer ...` header; `None` without the header.
pub fn bearer(headers: &HeaderMap) -> Option<Result<&str, AuthFailure>> {
    let value = headers.get(header::AUTHORIZATION)?;
    Some((|| {
        let value = value.to_str().map_err(|_| AuthFailure::Malformed)?.trim();
        let (scheme, credential) = value.split_once(' ').ok_or(AuthFailure::Malformed)?;
        if scheme.eq_ignore_ascii_case("bearer") {
            Ok(credential.trim())
        } else {
            Err(AuthFailure::Malformed)
        }
    })())
}

fn refuse(failure: AuthFailure) -> Response {
    metrics::counter!("herald_auth_failures_total", "reason" => failure.reason()).increment(1);
    ApiError::Unauthorized(failure.message().to_owned()).into_response()
}

/// Authorizes a request on a route by its [`Rules`] (see the module docs).
pub async fn authorize(
    State(rules): State<Rules>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let principal = Principal::from_request_parts(&mut parts, &()).await?;
    let method = if parts.method == Method::HEAD {
        Method::GET
    } else {
        parts.method.clone()
    };
    let Some((_, need)) = rules.iter().find(|(m, _)| *m == method) else {
        tracing::error!(%method, path = parts.uri.path(), "a route has no access rule; refused");
        return Err(ApiError::Forbidden("no credential may call this".into()));
    };
    let (scope, owner) = match *need {
        Need::Scope(scope) => (scope, None),
        Need::ScopeOrOwner(scope, from) => (scope, Some(from)),
        Need::AnyScope(scopes) => match scopes.iter().find(|s| principal.has(**s)) {
            Some(held) => (*held, None),
            None => {
                let names: Vec<String> = scopes.iter().map(ToString::to_string).collect();
                return Err(ApiError::Forbidden(format!(
                    "this credential needs one of the scopes {}",
                    names.join(", ")
                )));
            }
        },
    };
    if !principal.has(scope) {
        let Principal::User(user) = principal else {
            return Err(ApiError::Forbidden(format!(
                "this credential lacks the scope {scope}"
            )));
        };
        let about = match owner {
            Some(UserIn::Path) => RawPathParams::from_request_parts(&mut parts, &())
                .await
                .ok()
                .and_then(|params| {
                    params
                        .iter()
                        .find(|(name, _)| *name == "id")
                        .map(|(_, v)| v.to_owned())
                }),
            Some(UserIn::Query) => query_param(parts.uri.query(), "userId"),
            None => None,
        };
        let about = about.and_then(|id| id.parse::<i64>().ok());
        if about != Some(user.get()) {
            return Err(ApiError::Forbidden(
                "a user token is accepted only on its own user's inbox, history and preferences"
                    .into(),
            ));
        }
    }
    Ok(next.run(Request::from_parts(parts, body)).await)
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized(AuthFailure::Missing.message().to_owned()))
    }
}
