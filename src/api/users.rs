//! The user directory: `PUT`/`GET /api/v1/users/{id}/contact`, and the bulk import
//! `POST /api/v1/users:import` (NDJSON or a JSON array, checked line by line).

use anyhow::Context;
use axum::{
    Json,
    body::Bytes,
    extract::{DefaultBodyLimit, FromRequest, Request, State},
    http::{HeaderMap, Method},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, value::RawValue};
use utoipa::{
    PartialSchema, ToSchema,
    openapi::{AllOfBuilder, ObjectBuilder, Ref, RefOr, Schema, Type},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    auth::{Need, Rules, guarded},
    error::{ApiError, ApiJson, ApiPath, BadRequest, NotFound, UnsupportedMediaType},
};
use crate::{
    auth::Scope,
    directory::{self, Contact},
    domain::{BirthYear, EmailAddress, PhoneNumber, Tag, Timezone, UserId},
};

/// Largest import body: about 100,000 users of typical size.
const MAX_IMPORT_BYTES: usize = 32 * 1024 * 1024;
/// Most rejected lines listed in an import report (the count covers them all).
const MAX_REPORTED_REJECTIONS: usize = 1_000;
/// Most users one import may list.
const MAX_IMPORT_USERS: usize = 200_000;
/// Longest line (or array item) an import parses. A user entry takes a few hundred bytes;
/// a longer one is refused unparsed, so that no single item becomes a large tree of values.
const MAX_IMPORT_LINE_BYTES: usize = 64 * 1024;
/// What a refused import is told to wait before trying again.
const IMPORT_RETRY_AFTER_SECS: u64 = 5;
/// Most tags one user may carry.
const MAX_TAGS: usize = 32;

/// The user routes: `users:read` to read the directory, `users:write` to change it.
pub fn router() -> OpenApiRouter<AppState> {
    const RULES: Rules = &[
        (Method::GET, Need::Scope(Scope::UsersRead)),
        (Method::PUT, Need::Scope(Scope::UsersWrite)),
        (Method::POST, Need::Scope(Scope::UsersWrite)),
    ];
    let (schemas, paths, import) = routes!(import);
    let import = import.layer(DefaultBodyLimit::max(MAX_IMPORT_BYTES));
    guarded(
        OpenApiRouter::new()
            .routes(routes!(read, write))
            .routes((schemas, paths, import)),
        RULES,
    )
}

/// The body of `PUT /api/v1/users/{id}/contact`. Every field is optional; an absent or null
/// field clears what was stored.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = ContactUpdate)]
pub struct ContactBody {
    email: Option<String>,
    phone: Option<String>,
    locale: Option<String>,
    timezone: Option<String>,
    birth_year: Option<i64>,
    tags: Option<Vec<String>>,
}

impl ContactBody {
    /// Checks every field; the message names the first bad one.
    fn parse(self) -> Result<Contact, String> {
        let tags = self.tags.unwrap_or_default();
        if tags.len() > MAX_TAGS {
            return Err(format!("tags: at most {MAX_TAGS} tags"));
        }
        Ok(Contact {
            email: self
                .email
                .as_deref()
                .map(EmailAddress::parse)
                .transpose()
                .map_err(|m| format!("email: {m}"))?,
            phone: self
                .phone
                .as_deref()
                .map(PhoneNumber::parse)
                .transpose()
                .map_err(|m| format!("phone: {m}"))?,
            locale: self
                .locale
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|m| format!("locale: {m}"))?,
            timezone: self
                .timezone
                .as_deref()
                .map(Timezone::parse)
                .transpose()
                .map_err(|m| format!("timezone: {m}"))?,
            birth_year: self
                .birth_year
                .map(BirthYear::new)
                .transpose()
                .map_err(|m| format!("birthYear: {m}"))?,
            tags: tags
                .iter()
                .map(|t| Tag::parse(t))
                .collect::<Result<_, _>>()
                .map_err(|m| format!("tags: {m}"))?,
            updated_at: None,
        })
    }
}

/// A user's directory entry as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Contact)]
pub struct ContactView {
    user_id: UserId,
    #[serde(flatten)]
    contact: Contact,
}

/// One user of an import: the body of `PUT /api/v1/users/{id}/contact` plus its `userId`
/// (see [`import_line`]).
struct ImportLine;

impl PartialSchema for ImportLine {
    fn schema() -> RefOr<Schema> {
        let user_id = ObjectBuilder::new()
            .property(
                "userId",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1)),
            )
            .required("userId");
        AllOfBuilder::new()
            .item(Ref::from_schema_name(ContactBody::name()))
            .item(user_id)
            .into()
    }
}

impl ToSchema for ImportLine {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((ContactBody::name().into(), ContactBody::schema()));
    }
}

/// What an import did.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct ImportReport {
    /// Lines (or array items) read, blank lines aside.
    received: usize,
    /// Users created or replaced.
    imported: usize,
    /// Lines refused, each with its reason; nothing of a refused line is stored.
    rejected: usize,
    /// The first rejections (at most 1,000), with 1-based line (or item) numbers.
    rejections: Vec<Rejection>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Rejection {
    line: usize,
    error: String,
}

/// Parses a path or query user id.
pub fn user_id(raw: i64) -> Result<UserId, ApiError> {
    UserId::new(raw).map_err(ApiError::BadRequest)
}

/// Stores where to reach a user (replacing the entry): every field is optional, and an
/// absent or null one clears what was stored.
#[utoipa::path(
    put,
    path = "/api/v1/users/{id}/contact",
    operation_id = "putContact",
    tag = "users",
    params(UserPath),
    request_body = ContactBody,
    responses(
        (status = 200, description = "The entry as stored.", body = ContactView),
        (status = 400, response = BadRequest),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn write(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<ContactBody>,
) -> Result<Json<ContactView>, ApiError> {
    let user = user_id(id)?;
    let contact = body.parse().map_err(ApiError::BadRequest)?;
    let stored = directory::upsert(&state.db, user, &contact).await?;
    Ok(Json(ContactView {
        user_id: user,
        contact: stored,
    }))
}

/// The user a route is about (`{id}`), as the document declares it.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[expect(dead_code, reason = "read by ApiPath; declared for the document")]
pub(super) struct UserPath {
    /// The user, a positive integer.
    #[param(minimum = 1)]
    id: i64,
}

/// A user's directory entry.
#[utoipa::path(
    get,
    path = "/api/v1/users/{id}/contact",
    operation_id = "getContact",
    tag = "users",
    params(UserPath),
    responses(
        (status = 200, description = "The entry.", body = ContactView),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
    )
)]
async fn read(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<ContactView>, ApiError> {
    let user = user_id(id)?;
    let contact = directory::load(&state.db, user)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {user} has no directory entry")))?;
    Ok(Json(ContactView {
        user_id: user,
        contact,
    }))
}

/// `POST /api/v1/users:import`: a JSON array (`Content-Type: application/json`) or one JSON
/// object per line (`application/x-ndjson`). Good lines are stored
/// in one transaction; bad lines are reported and skipped. 400 only when the body as a
/// whole is unreadable (not UTF-8, or not an array when sent as JSON). 503 with Retry-After
/// while this instance already runs as many imports as it allows.
#[utoipa::path(
    post,
    path = "/api/v1/users:import",
    operation_id = "importUsers",
    tag = "users",
    request_body(
        description = "Up to 200,000 users (32 MiB): one JSON object per line, or a JSON array.",
        content(
            (String = "application/x-ndjson"),
            (Vec<ImportLine> = "application/json"),
        )
    ),
    responses(
        (status = 200, description = "What the import did.", body = ImportReport),
        (status = 400, response = BadRequest),
        (status = 415, response = UnsupportedMediaType),
    )
)]
async fn import(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<ImportReport>, ApiError> {
    // Taken before the body is read: each import holds up to MAX_IMPORT_BYTES of body plus
    // its parsed entries, so the bound on imports is a bound on that memory.
    let _permit = state
        .imports
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded {
            message: "this instance is running as many user imports as it allows; try again".into(),
            retry_after_secs: IMPORT_RETRY_AFTER_SECS,
        })?;
    let json_array = import_format(request.headers())?;
    let body = Bytes::from_request(request, &state).await?;
    // Tens of megabytes of JSON: parsed off the async workers.
    let (mut report, good) = tokio::task::spawn_blocking(move || read_import(&body, json_array))
        .await
        .context("the import parser panicked")??;
    let mut tx = state
        .db
        .begin()
        .await
        .context("Failed to begin the import")?;
    directory::upsert_many(&mut tx, &good).await?;
    tx.commit().await.context("Failed to commit the import")?;
    report.imported = good.len();
    metrics::counter!("herald_users_imported_total").increment(good.len() as u64);
    Ok(Json(report))
}

/// Whether an import body is a JSON array (`application/json`) rather than NDJSON
/// (`application/x-ndjson`, `application/ndjson` or `application/jsonl`); any other type
/// is refused, as for every body (see `error::require_json`).
fn import_format(headers: &HeaderMap) -> Result<bool, ApiError> {
    match super::error::media_type(headers).as_deref() {
        Some("application/json") => Ok(true),
        Some("application/x-ndjson" | "application/ndjson" | "application/jsonl") => Ok(false),
        _ => Err(ApiError::UnsupportedMediaType(
            "send the users as application/json (an array) or application/x-ndjson (a line each)"
                .into(),
        )),
    }
}

/// Checks an import body line by line (or item by item): the good entries, and a report of
/// the rest.
///
/// A JSON array is read one element at a time (a [`serde::de::Visitor`] over the sequence),
/// never as a whole `Vec<Value>`: a 32 MiB body of `[0,0,...]` would otherwise become
/// hundreds of megabytes of values before the count cap could refuse it. Each element is
/// checked as soon as it is read and the parse stops at the cap.
fn read_import(
    body: &[u8],
    json_array: bool,
) -> Result<(ImportReport, Vec<(UserId, Contact)>), ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not UTF-8: {e}")))?;
    let mut collector = Collector::default();
    if json_array {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let parsed = serde::Deserializer::deserialize_seq(&mut deserializer, &mut collector)
            .and_then(|()| deserializer.end());
        if let Some(over) = collector.over_cap.take() {
            return Err(over);
        }
        parsed.map_err(|e| {
            ApiError::BadRequest(format!(
                "the body is not a JSON array of users ({e}); send NDJSON as application/x-ndjson"
            ))
        })?;
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            collector.line(i + 1, parse_line(line))?;
        }
    }
    if collector.report.received == 0 {
        return Err(ApiError::BadRequest("the body lists no users".into()));
    }
    Ok((collector.report, collector.good))
}

/// The import's running result, fed one line (or array item) at a time.
#[derive(Default)]
struct Collector {
    report: ImportReport,
    good: Vec<(UserId, Contact)>,
    /// Set when the count cap stopped a JSON array part way (serde's error type cannot
    /// carry it out of the visitor).
    over_cap: Option<ApiError>,
}

impl Collector {
    /// Checks one line; refuses the whole import once it lists more than the cap.
    fn line(&mut self, line: usize, value: Result<Value, String>) -> Result<(), ApiError> {
        let report = &mut self.report;
        report.received += 1;
        if report.received > MAX_IMPORT_USERS {
            return Err(ApiError::BadRequest(format!(
                "an import may list at most {MAX_IMPORT_USERS} users; split it"
            )));
        }
        match value.and_then(import_line) {
            Ok(entry) => self.good.push(entry),
            Err(error) => {
                report.rejected += 1;
                if report.rejections.len() < MAX_REPORTED_REJECTIONS {
                    report.rejections.push(Rejection { line, error });
                }
            }
        }
        Ok(())
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Collector {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of users")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let mut number = 0;
        // Borrowed slices of the body: skipping over an item allocates nothing.
        while let Some(item) = items.next_element::<&'de RawValue>()? {
            number += 1;
            if let Err(error) = self.line(number, parse_line(item.get())) {
                self.over_cap = Some(error);
                return Err(serde::de::Error::custom("too many users"));
            }
        }
        Ok(())
    }
}

/// Parses one line (or array item), unless it is too long to be a user entry.
fn parse_line(text: &str) -> Result<Value, String> {
    if text.len() > MAX_IMPORT_LINE_BYTES {
        return Err(format!(
            "longer than {MAX_IMPORT_LINE_BYTES} bytes; not parsed"
        ));
    }
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

/// One import line: a contact body plus its userId (taken out by hand, because serde's
/// flatten would not refuse unknown fields).
fn import_line(value: Value) -> Result<(UserId, Contact), String> {
    if crate::ingest::decode::contains_nul(&value) {
        return Err("contains a NUL character (\\u0000)".to_owned());
    }
    let Value::Object(mut fields) = value else {
        return Err("not a JSON object".to_owned());
    };
    let user = fields
        .remove("userId")
        .ok_or("userId is missing")?
        .as_i64()
        .and_then(|id| UserId::new(id).ok())
        .ok_or("userId must be a positive integer")?;
    let contact: ContactBody =
        serde_json::from_value(Value::Object(fields)).map_err(|e| e.to_string())?;
    Ok((user, contact.parse()?))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_json_array_is_refused_at_the_cap_before_the_rest_of_it_is_parsed() {
        // Past the cap comes a syntax error: a parser that read the whole array before
        // counting would report that instead.
        let body = format!("[{}0, this is not JSON", "0,".repeat(MAX_IMPORT_USERS));

        let error = read_import(body.as_bytes(), true).unwrap_err();

        assert!(
            error
                .to_string()
                .contains(&format!("at most {MAX_IMPORT_USERS} users")),
            "{error}"
        );
    }

    #[test]
    fn a_json_array_gets_the_same_report_as_the_same_items_as_ndjson() {
        let items = [
            json!({"userId": 1, "email": "a@example.com"}),
            json!(0),
            json!({"userId": 2, "shoeSize": 44}),
            json!({"userId": 3, "tags": ["x"]}),
        ];
        let array = serde_json::to_string(&items).unwrap();
        let ndjson = items.map(|i| i.to_string()).join("\n");

        let (from_array, good_array) = read_import(array.as_bytes(), true).unwrap();
        let (from_lines, good_lines) = read_import(ndjson.as_bytes(), false).unwrap();

        let report = serde_json::to_value(&from_array).unwrap();
        assert_eq!(report, serde_json::to_value(&from_lines).unwrap());
        assert_eq!(
            (&report["received"], &report["rejected"]),
            (&json!(4), &json!(2))
        );
        let lines: Vec<&Value> = report["rejections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["line"])
            .collect();
        assert_eq!(lines, [&json!(2), &json!(3)]);
        let users =
            |good: &[(UserId, Contact)]| good.iter().map(|(u, _)| u.get()).collect::<Vec<_>>();
        assert_eq!(users(&good_array), [1, 3]);
        assert_eq!(users(&good_lines), [1, 3]);
    }

    #[test]
    fn an_item_too_long_to_be_a_user_is_refused_without_being_parsed() {
        // 40,000 numbers would be 40,000 values; refused by length instead.
        let huge = format!("[{}0]", "0,".repeat(40_000));
        let array = format!(r#"[{{"userId": 1}}, {huge}]"#);
        let ndjson = format!("{{\"userId\": 1}}\n{huge}");

        for (body, json_array) in [(array, true), (ndjson, false)] {
            let (report, good) = read_import(body.as_bytes(), json_array).unwrap();

            assert_eq!((report.received, good.len()), (2, 1));
            assert_eq!(report.rejections[0].line, 2);
            assert!(
                report.rejections[0].error.starts_with("longer than"),
                "{}",
                report.rejections[0].error
            );
        }
    }

    #[test]
    fn a_json_body_that_is_not_one_whole_array_is_refused() {
        for body in [r#"{"userId": 1}"#, r#"[{"userId": 1}] trailing"#, "[0, 0"] {
            let error = read_import(body.as_bytes(), true).unwrap_err();
            assert!(
                matches!(&error, ApiError::BadRequest(m) if m.contains("array")),
                "{body}: {error}"
            );
        }
    }
}
