//! The OpenAPI document and the docs page: the document is served, names every route, and
//! names no route the app does not serve.

use std::{collections::BTreeSet, time::Duration};

use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app};

/// Every route of the app (method, path template), which the document must name.
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
