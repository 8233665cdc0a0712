//! The OpenAPI document and the docs page: the document is derived from the code, names
//! exactly the public routes and no route the app does not serve, passes
//! openapi-spec-validator, and describes what the app really answers.

use std::{collections::BTreeSet, time::Duration};

use reqwest::Method;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, envelope, spawn_app, wait_until};

/// Every route of the app (method, path template): the public contract, which the document
/// (derived from the routes themselves) must name exactly.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/notifications"),
    ("GET", "/api/v1/notifications"),
    ("GET", "/api/v1/notifications/{id}"),
    ("GET", "/api/v1/notifications/settings"),
    ("PUT", "/api/v1/notifications/settings"),
    ("GET", "/api/v1/users/{id}/contact"),
    ("PUT", "/api/v1/users/{id}/contact"),
    ("POST", "/api/v1/users:import"),
    ("POST", "/api/v1/broadcasts"),
    ("GET", "/api/v1/broadcasts"),
    ("GET", "/api/v1/broadcasts/{id}"),
    ("POST", "/api/v1/broadcasts/{id}/cancel"),
    ("GET", "/api/v1/users/{id}/inbox"),
    ("GET", "/api/v1/users/{id}/inbox/unread-count"),
    ("POST", "/api/v1/users/{id}/inbox/read-all"),
    ("POST", "/api/v1/users/{id}/inbox/{delivery}/read"),
    ("GET", "/api/v1/users/{id}/inbox/stream"),
    ("GET", "/api/v1/dashboard/delivery"),
    ("GET", "/api/v1/dashboard/delivery/channels"),
    ("GET", "/api/v1/dashboard/delivery/failures"),
    ("GET", "/api/v1/admin/dlq"),
    ("POST", "/api/v1/admin/dlq/retry-all"),
    ("GET", "/api/v1/admin/dlq/counts"),
    ("GET", "/api/v1/admin/alerts"),
    ("GET", "/api/v1/admin/dlq/{id}"),
    ("DELETE", "/api/v1/admin/dlq/{id}"),
    ("POST", "/api/v1/admin/dlq/{id}/retry"),
    ("PATCH", "/api/v1/admin/dlq/{id}"),
    ("POST", "/api/v1/admin/dlq/replay"),
    ("GET", "/api/v1/admin/dlq/replays"),
    ("GET", "/api/v1/admin/dlq/replays/{id}"),
    ("POST", "/api/v1/admin/dlq/replays/{id}/cancel"),
    ("POST", "/api/v1/admin/keys"),
    ("GET", "/api/v1/admin/keys"),
    ("DELETE", "/api/v1/admin/keys/{id}"),
    ("GET", "/api/v1/event-types"),
    ("GET", "/api/v1/event-types/{eventType}"),
    ("GET", "/api/v1/templates/{eventType}/{locale}/{part}"),
    ("PUT", "/api/v1/templates/{eventType}/{locale}/{part}"),
    (
        "POST",
        "/api/v1/templates/{eventType}/{locale}/{part}/versions/{version}/activate",
    ),
    ("POST", "/api/v1/templates/{eventType}/preview"),
    ("POST", "/api/v1/receipts/{channel}"),
    ("GET", "/api/v1/admin/suppressions"),
    ("DELETE", "/api/v1/admin/suppressions/{id}"),
    ("POST", "/api/v1/webhooks"),
    ("GET", "/api/v1/webhooks"),
    ("GET", "/api/v1/webhooks/{id}"),
    ("DELETE", "/api/v1/webhooks/{id}"),
    ("POST", "/api/v1/webhooks/{id}/enable"),
    ("GET", "/api/v1/webhooks/{id}/deliveries"),
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("GET", "/metrics"),
    ("GET", "/api-docs/openapi.json"),
    ("GET", "/console"),
    ("GET", "/docs"),
];

/// The HTTP methods an OpenAPI path item may hold operations under.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

pub async fn openapi(app: &TestApp) -> Value {
    let response = app.get("/api-docs/openapi.json").await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    response.json().await.expect("the document is JSON")
}

/// Every (METHOD, path) the document names.
pub fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    doc["paths"]
        .as_object()
        .expect("the document has paths")
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .into_iter()
                .filter(|m| item.get(*m).is_some())
                .map(|m| (m.to_uppercase(), path.clone()))
        })
        .collect()
}

/// Follows a local `$ref` (`#/components/...`), if there is one.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(pointer) => {
            let target = doc
                .pointer(pointer.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("{pointer} resolves"));
            resolve(doc, target)
        }
        None => value,
    }
}

/// A sample value for a path parameter: 1 for integers (user ids), a random UUID otherwise.
fn sample(doc: &Value, operation: &Value, name: &str) -> String {
    let parameter = operation["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| resolve(doc, p))
        .find(|p| p["in"] == "path" && p["name"] == name)
        .unwrap_or_else(|| panic!("path parameter {name} is documented"));
    if let Some(example) = parameter["example"].as_str() {
        example.to_owned()
    } else if resolve(doc, &parameter["schema"])["type"] == "integer" {
        "1".to_owned()
    } else {
        Uuid::new_v4().to_string()
    }
}

/// The path with each `{name}` replaced by a sample value.
pub fn fill(doc: &Value, operation: &Value, template: &str) -> String {
    let mut path = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let end = rest[start..].find('}').expect("a closed path parameter") + start;
        path.push_str(&rest[..start]);
        path.push_str(&sample(doc, operation, &rest[start + 1..end]));
        rest = &rest[end + 1..];
    }
    path.push_str(rest);
    path
}

/// Whether a response body is the router's fallback, which answers only unknown routes.
fn is_fallback(body: &Value) -> bool {
    body["error"]["code"] == "not_found" && body["error"]["message"] == "no such route"
}

#[tokio::test]
async fn the_openapi_document_is_json_in_openapi_3_1_naming_every_route() {
    let app = spawn_app().await;

    let doc = openapi(&app).await;

    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.1."), "openapi is {version:?}");
    assert_eq!(doc["info"]["title"], "Herald");
    let documented = operations(&doc);
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = routes.difference(&documented).collect();
    assert!(missing.is_empty(), "not documented: {missing:?}");
    let unlisted: Vec<_> = documented.difference(&routes).collect();
    assert!(
        unlisted.is_empty(),
        "documented but not in ROUTES: {unlisted:?}"
    );
}

/// DESIGN §5a in the document: every `/api/v1` operation names the credential it needs (API
/// key scopes, the user token on a user's own routes, the signature on receipts) and the
/// 401 and 403 it answers; health, metrics, docs and the console are open (`security: []`).
/// (`access.rs` calls every operation with and without what the document names.)
#[tokio::test]
async fn every_api_operation_names_its_credentials_and_every_other_is_open() {
    let app = spawn_app().await;
    let doc = openapi(&app).await;
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    assert_eq!(schemes["apiKey"]["scheme"], "bearer");
    assert_eq!(schemes["userToken"]["bearerFormat"], "JWT");

    for (method, path) in operations(&doc) {
        let operation = &doc["paths"][&path][method.to_lowercase()];
        let security = operation["security"]
            .as_array()
            .unwrap_or_else(|| panic!("{method} {path} declares its security"));
        if !path.starts_with("/api/") {
            assert!(security.is_empty(), "{method} {path} is open: {security:?}");
            continue;
        }
        assert!(!security.is_empty(), "{method} {path} names no credential");
        for requirement in security {
            let (scheme, scopes) = requirement.as_object().unwrap().iter().next().unwrap();
            assert!(schemes.contains_key(scheme), "{method} {path}: {scheme}");
            if scheme == "apiKey" {
                let scope = scopes[0].as_str().unwrap();
                assert!(
                    scope.parse::<herald::auth::Scope>().is_ok(),
                    "{method} {path}: {scope} is not a scope"
                );
            }
        }
        assert!(
            operation["responses"].get("401").is_some(),
            "{method} {path}"
        );
        if !path.starts_with("/api/v1/receipts/") {
            assert!(
                operation["responses"].get("403").is_some(),
                "{method} {path}"
            );
        }
    }
    let own = |method: &str, path: &str| {
        doc["paths"][path][method]["security"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.get("userToken").is_some())
    };
    for (method, path) in [
        ("get", "/api/v1/notifications"),
        ("get", "/api/v1/notifications/settings"),
        ("put", "/api/v1/notifications/settings"),
        ("get", "/api/v1/users/{id}/inbox"),
        ("get", "/api/v1/users/{id}/inbox/unread-count"),
        ("post", "/api/v1/users/{id}/inbox/read-all"),
        ("post", "/api/v1/users/{id}/inbox/{delivery}/read"),
        ("get", "/api/v1/users/{id}/inbox/stream"),
    ] {
        assert!(own(method, path), "a user token opens {method} {path}");
    }
    assert!(!own("post", "/api/v1/notifications"));
    assert!(!own("get", "/api/v1/admin/dlq"));
}

/// The document follows the types: each response schema below names exactly the fields a
/// value of its type serializes to, so a field added to (or removed from) a type is in the
/// document without anyone editing it.
#[test]
fn a_response_schema_names_exactly_the_fields_its_type_serializes() {
    let doc = serde_json::to_value(herald::api::openapi()).unwrap();
    let schemas = &doc["components"]["schemas"];
    let fields = |name: &str| -> BTreeSet<String> {
        schemas[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{name} has properties"))
            .keys()
            .cloned()
            .collect()
    };
    let keys =
        |value: Value| -> BTreeSet<String> { value.as_object().unwrap().keys().cloned().collect() };

    let error = herald::api::error::ErrorBody::new("conflict", "no");
    assert_eq!(fields("Error"), keys(serde_json::to_value(&error).unwrap()));
    let mut detail = serde_json::to_value(&error.error).unwrap();
    // `details` is left out when empty: the schema names it, not as required.
    detail["details"] = json!([]);
    assert_eq!(fields("ErrorDetail"), keys(detail));
    assert_eq!(
        schemas["ErrorDetail"]["required"],
        json!(["code", "message"])
    );

    let totals = herald::broadcast::Totals::default();
    assert_eq!(
        fields("BroadcastTotals"),
        keys(serde_json::to_value(&totals).unwrap())
    );
    let report = herald::dlq::admin::RetryAllReport::default();
    assert_eq!(
        fields("RetryAllReport"),
        keys(serde_json::to_value(&report).unwrap())
    );
    let dry_run = herald::dlq::replay::DryRun::default();
    assert_eq!(
        fields("ReplayDryRun"),
        keys(serde_json::to_value(&dry_run).unwrap())
    );
    let segment = herald::broadcast::Segment {
        age_min: Some(20),
        age_max: Some(30),
        locale: Some(herald::domain::Locale::Ko),
        tags: vec![herald::domain::Tag::parse("vip").unwrap()],
    };
    assert_eq!(
        fields("Segment"),
        keys(serde_json::to_value(&segment).unwrap())
    );
}

#[tokio::test]
async fn every_operation_in_the_document_is_a_route_the_app_serves() {
    let app = spawn_app().await;
    let doc = openapi(&app).await;
    // The check below recognises the fallback by its body: make sure that body is still
    // what an unknown route gets, or the check would pass vacuously.
    let unknown = app.get("/api/v1/no-such-route").await;
    assert_eq!(unknown.status(), 404);
    assert!(is_fallback(&unknown.json().await.unwrap()));

    for (method, template) in operations(&doc) {
        let operation = &doc["paths"][&template][method.to_lowercase()];
        let path = fill(&doc, operation, &template);
        let response = app
            .http
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", app.address),
            )
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status();
        assert_ne!(status, 405, "{method} {path}: the route has no {method}");
        // The stream never ends: its status is all there is to read.
        if template.ends_with("/inbox/stream") {
            assert_eq!(status, 200, "{method} {path}");
            continue;
        }
        if status == 404 {
            let body: Value = response.json().await.unwrap_or_default();
            assert!(
                !is_fallback(&body),
                "{method} {path}: the document names a route the app does not serve"
            );
        }
    }
}

/// The document as served (with the event types' data schemas it adds) passes
/// openapi-spec-validator, which `scripts/stack.sh install` puts in `.tools/openapi`.
#[tokio::test]
async fn the_served_openapi_document_passes_openapi_spec_validator() {
    let app = spawn_app().await;
    let doc = openapi(&app).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let validator = root.join(".tools/openapi/bin/openapi-spec-validator");
    assert!(
        validator.exists(),
        "openapi-spec-validator is not installed: run scripts/stack.sh install"
    );
    let file = std::env::temp_dir().join(format!("herald-openapi-{}.json", Uuid::new_v4()));
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let output = std::process::Command::new(&validator)
        .args(["--schema", "3.1", "--errors", "all"])
        .arg(&file)
        .output()
        .expect("openapi-spec-validator runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_docs_page_and_its_assets_are_served_by_herald_itself() {
    let app = spawn_app().await;

    // /docs redirects to /docs/ (reqwest follows it), the page of the embedded Swagger UI.
    let response = app.get("/docs").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.url().path().ends_with("/docs/"),
        "{}",
        response.url()
    );
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let page = response.text().await.unwrap();
    assert!(page.contains("swagger-ui"), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://") && !page.contains("//unpkg"),
        "the page loads nothing from elsewhere: {page}"
    );
    let initializer = app.get("/docs/swagger-initializer.js").await;
    assert_eq!(initializer.status(), 200);
    let initializer = initializer.text().await.unwrap();
    assert!(
        initializer.contains("/api-docs/openapi.json"),
        "{initializer}"
    );
    for (asset, kind) in [
        ("/docs/swagger-ui-bundle.js", "javascript"),
        ("/docs/swagger-ui.css", "text/css"),
    ] {
        let response = app.get(asset).await;
        assert_eq!(response.status(), 200, "{asset}");
        let content_type = response.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(content_type.contains(kind), "{asset}: {content_type}");
        assert!(
            response.bytes().await.unwrap().len() > 10_000,
            "{asset} is the real asset"
        );
    }
}

/// The docs page in a real browser (Debian's Chromium, headless; `scripts/stack.sh
/// install` installs it) that can reach no host but this machine: Swagger UI renders the
/// operations of the document.
#[tokio::test]
async fn the_docs_page_renders_its_operations_in_a_headless_browser_without_network() {
    let app = spawn_app().await;
    let profile = tempfile_dir();
    let url = format!("{}/docs/", app.address);
    let user_data = format!("--user-data-dir={}", profile.display());
    let browse = move || {
        std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                // Every name but loopback fails to resolve: no CDN, no internet.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--virtual-time-budget=20000",
                "--dump-dom",
            ])
            .arg(user_data)
            .arg(url)
            .output()
    };
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(browse),
    )
    .await
    .expect("chromium renders within 120 s")
    .unwrap()
    .expect("chromium runs (scripts/stack.sh install installs it)");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        dom.contains("opblock"),
        "Swagger UI rendered no operation: {}\n{}",
        &dom[..dom.len().min(2000)],
        String::from_utf8_lossy(&output.stderr)
    );
    for path in ["/api/v1/notifications", "/api/v1/admin/dlq/replay"] {
        assert!(dom.contains(path), "{path} is not on the rendered page");
    }
}

/// A fresh directory for a browser profile.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-chromium-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The document as a contract for real answers: each body must validate against the schema
/// the document declares for its operation and status, and carry no property that schema
/// does not name.
struct Contract {
    doc: Value,
}

impl Contract {
    /// The JSON schema of a response, `$ref`s left to resolve against the components.
    fn schema(&self, method: &Method, template: &str, status: u16) -> Value {
        let operation = &self.doc["paths"][template][method.as_str().to_lowercase()];
        assert!(operation.is_object(), "{method} {template} is documented");
        let response = resolve(&self.doc, &operation["responses"][status.to_string()]);
        let schema = &response["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {template} documents a JSON {status} answer: {response}"
        );
        schema.clone()
    }

    /// A schema that can be checked on its own: the document's components next to it.
    fn standalone(&self, schema: &Value) -> jsonschema::Validator {
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": self.doc["components"],
            "allOf": [schema],
        });
        jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("{schema} compiles: {e}"))
    }

    /// Sends a request, expects `status` and checks the answer against the document; the
    /// answer's body.
    async fn expect(
        &self,
        app: &TestApp,
        (method, template): (Method, &str),
        path: &str,
        body: Option<Value>,
        status: u16,
    ) -> Value {
        let mut request = app
            .http
            .request(method.clone(), format!("{}{path}", app.address));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let answered = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(answered, status, "{method} {path}: {body}");
        self.check(&method, template, status, &body);
        body
    }

    /// Checks one answer against the document.
    fn check(&self, method: &Method, template: &str, status: u16, body: &Value) {
        let schema = self.schema(method, template, status);
        self.conform(&schema, body, &format!("{method} {template} {status}"));
    }

    /// Checks a value against a schema: valid, and no property the schema does not name.
    fn conform(&self, schema: &Value, value: &Value, what: &str) {
        let errors: Vec<String> = self
            .standalone(schema)
            .iter_errors(value)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what} breaks its schema: {errors:#?}\n{value:#}"
        );
        let mut undocumented = Vec::new();
        self.undocumented(schema, value, "", &mut undocumented);
        assert!(
            undocumented.is_empty(),
            "{what} has properties its schema does not name: {undocumented:?}\n{value:#}"
        );
    }

    /// The example of a shared error response.
    fn error_example(&self, response: &str) -> &Value {
        &self.doc["components"]["responses"][response]["content"]["application/json"]["example"]
    }

    /// Collects the paths of properties in `value` that `schema` does not name.
    fn undocumented(&self, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
        let schema = resolve(&self.doc, schema);
        for choice in ["oneOf", "anyOf"] {
            if let Some(branches) = schema[choice].as_array() {
                if let Some(branch) = branches.iter().find(|b| self.standalone(b).is_valid(value)) {
                    self.undocumented(branch, value, at, out);
                }
                return;
            }
        }
        match value {
            Value::Object(fields) => {
                let (properties, others) = self.properties(schema);
                for (name, field) in fields {
                    let at = format!("{at}/{name}");
                    match properties.get(name).or(others.as_ref()) {
                        Some(schema) => self.undocumented(schema, field, &at, out),
                        None => out.push(at),
                    }
                }
            }
            Value::Array(items) => {
                if let Some(schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.undocumented(schema, item, &format!("{at}/{i}"), out);
                    }
                }
            }
            _ => {}
        }
    }

    /// The properties an object schema names (through `allOf`), and the schema of any other
    /// property it allows: its `additionalProperties`, or anything for a free-form object.
    fn properties(&self, schema: &Value) -> (Map<String, Value>, Option<Value>) {
        let schema = resolve(&self.doc, schema);
        let mut properties = schema["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut others = match schema.get("additionalProperties") {
            None | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(json!({})),
            Some(other) => Some(other.clone()),
        };
        for member in schema["allOf"].as_array().into_iter().flatten() {
            let (more, other) = self.properties(member);
            properties.extend(more);
            others = others.or(other);
        }
        if properties.is_empty() && schema.get("additionalProperties").is_none() {
            others = Some(json!({}));
        }
        (properties, others)
    }
}

/// Real answers of the main operations, each checked against the schema the document
/// declares for its status: what the document says is what the app sends.
#[tokio::test]
async fn real_answers_match_the_schemas_the_document_declares_for_them() {
    let app = spawn_app().await;
    let api = Contract {
        doc: openapi(&app).await,
    };
    let get = |template| (Method::GET, template);
    let post = |template| (Method::POST, template);
    let put = |template| (Method::PUT, template);
    let delete = |template| (Method::DELETE, template);
    // Operations whose path is their template, with what they answer to a plain GET.
    for (template, status) in [
        ("/health/live", 200),
        ("/api/v1/dashboard/delivery", 200),
        ("/api/v1/dashboard/delivery/channels", 200),
        ("/api/v1/dashboard/delivery/failures", 200),
        ("/api/v1/admin/alerts", 200),
        ("/api/v1/admin/suppressions", 200),
        ("/api/v1/admin/dlq/replays", 200),
        ("/api/v1/webhooks", 200),
        ("/api/v1/event-types", 200),
    ] {
        api.expect(&app, get(template), template, None, status)
            .await;
    }
    let ready = app.get("/health/ready").await.status().as_u16();
    api.expect(&app, get("/health/ready"), "/health/ready", None, ready)
        .await;

    // A poison message, to have a dead letter by the time the rest is done.
    app.publish("fluxpay.order.events", "7", b"{\"this is\": not json")
        .await;

    let user = 7;
    let intake = json!({
        "userId": user,
        "recipient": { "email": "buyer@example.com", "locale": "ko" },
        "channels": ["EMAIL", "IN_APP", "SMS"],
        "eventType": "ORDER_SHIPPED",
        "data": { "orderId": "o-77", "carrier": "CJ" }
    });
    let notifications = "/api/v1/notifications";
    let accepted = api
        .expect(&app, post(notifications), notifications, Some(intake), 202)
        .await;
    let one = "/api/v1/notifications/{id}";
    let id = accepted["notificationId"].as_str().unwrap();
    api.expect(&app, get(one), &format!("{notifications}/{id}"), None, 200)
        .await;
    let unknown = format!("{notifications}/{}", Uuid::new_v4());
    api.expect(&app, get(one), &unknown, None, 404).await;
    // A delivery held for later answers with its hold, and reads back with its reason.
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let later = json!({
        "userId": user, "channels": ["EMAIL"], "eventType": "ORDER_SHIPPED",
        "recipient": { "email": "buyer@example.com" },
        "data": { "orderId": "o-78" }, "scheduledAt": tomorrow
    });
    let held = api
        .expect(&app, post(notifications), notifications, Some(later), 202)
        .await;
    assert_eq!(
        held["deliveries"][0]["hold"]["reason"], "scheduled",
        "{held}"
    );
    let held = format!(
        "{notifications}/{}",
        held["notificationId"].as_str().unwrap()
    );
    let view = api.expect(&app, get(one), &held, None, 200).await;
    assert_eq!(view["deliveries"][0]["holdReason"], "scheduled", "{view}");
    let history = format!("{notifications}?userId={user}");
    wait_until(30, "the history shows the notification", || async {
        let page: Value = app.get(&history).await.json().await.unwrap();
        page["items"]
            .as_array()
            .is_some_and(|items| !items.is_empty())
    })
    .await;
    api.expect(&app, get(notifications), &history, None, 200)
        .await;
    let nobody = format!("{notifications}?userId=0");

    let settings = "/api/v1/notifications/settings";
    let at = format!("{settings}?userId={user}");
    let change = json!({
        "channels": { "EMAIL": false },
        "eventTypes": { "ORDER_SHIPPED": { "IN_APP": false } },
        "quietHours": [{ "from": "22:00", "to": "08:00", "channels": ["PUSH"] }]
    });
    api.expect(&app, put(settings), &at, Some(change), 200)
        .await;
    api.expect(&app, get(settings), &at, None, 200).await;

    let contact = "/api/v1/users/{id}/contact";
    let at = format!("/api/v1/users/{user}/contact");
    let entry = json!({
        "email": "u7@example.com", "locale": "en", "timezone": "Asia/Seoul",
        "birthYear": 1990, "tags": ["vip"]
    });
    api.expect(&app, put(contact), &at, Some(entry), 200).await;
    api.expect(&app, get(contact), &at, None, 200).await;
    let import = "/api/v1/users:import";
    let users = json!([{ "userId": 8, "email": "u8@example.com" }, { "userId": 0 }]);
    let report = api
        .expect(&app, post(import), import, Some(users), 200)
        .await;
    assert_eq!(report["rejected"], 1, "{report}");

    for (operation, path) in [
        (get("/api/v1/users/{id}/inbox"), "/api/v1/users/7/inbox"),
        (
            get("/api/v1/users/{id}/inbox/unread-count"),
            "/api/v1/users/7/inbox/unread-count",
        ),
        (
            post("/api/v1/users/{id}/inbox/read-all"),
            "/api/v1/users/7/inbox/read-all",
        ),
        (
            get("/api/v1/event-types/{eventType}"),
            "/api/v1/event-types/ORDER_SHIPPED",
        ),
        (
            get("/api/v1/templates/{eventType}/{locale}/{part}"),
            "/api/v1/templates/ORDER_SHIPPED/ko/email_subject",
        ),
    ] {
        api.expect(&app, operation, path, None, 200).await;
    }
    let preview = "/api/v1/templates/{eventType}/preview";
    let sample = json!({ "data": envelope("ORDER_SHIPPED", user, json!({}))["data"] });
    let at = "/api/v1/templates/ORDER_SHIPPED/preview";
    api.expect(&app, post(preview), at, Some(sample), 200).await;

    let keys = "/api/v1/admin/keys";
    let new_key = json!({ "name": "docs", "scopes": ["dashboard:read"] });
    api.expect(&app, post(keys), keys, Some(new_key), 201).await;
    api.expect(&app, get(keys), keys, None, 200).await;

    let broadcasts = "/api/v1/broadcasts";
    let message = json!({
        "name": "notice",
        "audience": { "userIds": [user, 8] },
        "channels": ["IN_APP"],
        "subject": "Service notice",
        "body": "Maintenance on Sunday.",
    });
    let created = api
        .expect(&app, post(broadcasts), broadcasts, Some(message), 202)
        .await;
    api.expect(&app, get(broadcasts), broadcasts, None, 200)
        .await;
    let at = format!("{broadcasts}/{}", created["broadcastId"].as_str().unwrap());
    api.expect(&app, get("/api/v1/broadcasts/{id}"), &at, None, 200)
        .await;

    let dlq = "/api/v1/admin/dlq";
    wait_until(30, "the poison message is dead-lettered", || async {
        let page: Value = app.get(dlq).await.json().await.unwrap();
        page["items"]
            .as_array()
            .is_some_and(|items| !items.is_empty())
    })
    .await;
    let page = api.expect(&app, get(dlq), dlq, None, 200).await;
    let counts = "/api/v1/admin/dlq/counts";
    api.expect(&app, get(counts), counts, None, 200).await;
    let replay = "/api/v1/admin/dlq/replay";
    let dry_run = json!({ "dryRun": true });
    api.expect(&app, post(replay), replay, Some(dry_run), 200)
        .await;
    let one = "/api/v1/admin/dlq/{id}";
    let at = format!("{dlq}/{}", page["items"][0]["id"].as_str().unwrap());
    api.expect(&app, get(one), &at, None, 200).await;
    api.expect(&app, delete(one), &at, None, 200).await;

    // Refusals carry the error body the document names, and its examples are real answers.
    let refused = app
        .anonymous
        .get(format!("{}{dlq}", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let refused: Value = refused.json().await.unwrap();
    api.check(&Method::GET, dlq, 401, &refused);
    assert_eq!(&refused, api.error_example("Unauthorized"));
    let bad = api
        .expect(&app, get(notifications), &nobody, None, 400)
        .await;
    assert_eq!(&bad, api.error_example("BadRequest"));
    let url = format!("{}{notifications}", app.address);
    let as_text = app.http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(as_text.status(), 415);
    let as_text: Value = as_text.json().await.unwrap();
    api.check(&Method::POST, notifications, 415, &as_text);
    assert_eq!(&as_text, api.error_example("UnsupportedMediaType"));
    let huge = json!({ "userId": user, "subject": "big", "body": "x".repeat(300 * 1024) });
    let huge = app.http.post(&url).json(&huge).send().await.unwrap();
    assert_eq!(huge.status(), 413);
    let huge: Value = huge.json().await.unwrap();
    api.check(&Method::POST, notifications, 413, &huge);
    assert_eq!(&huge, api.error_example("PayloadTooLarge"));
    // Every shared error response's example has the error body's shape.
    let error = json!({ "$ref": "#/components/schemas/Error" });
    for (name, _) in api.doc["components"]["responses"].as_object().unwrap() {
        api.conform(&error, api.error_example(name), name);
    }
}
