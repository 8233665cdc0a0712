//! Who may call what (DESIGN §5a): every operation of the OpenAPI document walked with no
//! credential, a key without the operation's scope, a key with it, and user tokens; keys
//! made and revoked; Idempotency-Keys per credential; audit names; CORS and content types.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    docs::{fill, openapi, operations},
    helpers::{
        ADMIN_TOKEN, TestApp, USER_TOKEN_SECRET, envelope, spawn_app, spawn_app_on, spawn_app_with,
        wait_until,
    },
};
use herald::roles::Role;

/// Every scope a key can hold.
const SCOPES: [&str; 13] = [
    "notifications:write",
    "notifications:read",
    "users:write",
    "users:read",
    "broadcasts:write",
    "broadcasts:read",
    "dashboard:read",
    "dlq:admin",
    "keys:admin",
    "templates:read",
    "templates:write",
    "suppressions:admin",
    "webhooks:admin",
];

/// One operation of the document, with what its `security` says.
struct Operation {
    method: Method,
    template: String,
    path: String,
    /// The API-key scope it needs (the first of its alternatives); `None` for the open
    /// routes.
    scope: Option<String>,
    /// Every scope that alone lets a key through (OpenAPI security alternatives).
    alternatives: Vec<String>,
    /// Whether a user token may call it for its own user.
    user_token: bool,
    /// Signed by its caller instead (provider receipts): no credential, a signature.
    signed: bool,
}

async fn operations_of(app: &TestApp) -> Vec<Operation> {
    let doc = openapi(app).await;
    operations(&doc)
        .into_iter()
        .map(|(method, template)| {
            let operation = &doc["paths"][&template][method.to_lowercase()];
            let security = operation["security"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {template} declares its security"));
            let alternatives: Vec<String> = security
                .iter()
                .filter_map(|s| s["apiKey"][0].as_str())
                .map(str::to_owned)
                .collect();
            let scope = alternatives.first().cloned();
            let user_token = security.iter().any(|s| s.get("userToken").is_some());
            let signed = security.iter().any(|s| s.get("receiptSignature").is_some());
            Operation {
                method: method.parse().unwrap(),
                path: fill(&doc, operation, &template),
                template,
                scope,
                alternatives,
                user_token,
                signed,
            }
        })
        .collect()
}

/// Calls an operation with a bearer credential (or none), without a body; the stream's
/// status is read and the stream dropped.
async fn call(app: &TestApp, method: &Method, path: &str, bearer: Option<&str>) -> StatusCode {
    let mut request = app
        .anonymous
        .request(method.clone(), format!("{}{path}", app.address))
        .timeout(Duration::from_secs(10));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
        .status()
}

/// The path of an operation with every user id in it (path `{id}` of a user route, and
/// `userId=`) set to `user`.
fn as_user(operation: &Operation, user: i64) -> String {
    let path = if operation.template.starts_with("/api/v1/users/{id}") {
        operation
            .path
            .replacen("/api/v1/users/1/", &format!("/api/v1/users/{user}/"), 1)
    } else {
        operation.path.clone()
    };
    if operation.template == "/api/v1/notifications"
        || operation.template == "/api/v1/notifications/settings"
    {
        format!("{path}?userId={user}")
    } else {
        path
    }
}

#[tokio::test]
async fn every_api_operation_answers_an_anonymous_caller_401_with_www_authenticate() {
    let app = spawn_app().await;
    let operations = operations_of(&app).await;
    assert!(operations.len() > 25, "the document lists the API");

    for op in operations.iter().filter(|op| op.scope.is_some()) {
        let response = app
            .anonymous
            .request(op.method.clone(), format!("{}{}", app.address, op.path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{} {}", op.method, op.path);
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer realm="herald""#,
            "{} {}",
            op.method,
            op.path
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], "unauthorized",
            "{} {}",
            op.method, op.path
        );
    }
    // A signed route answers a caller without a signature 401 as well, with the same body.
    for op in operations.iter().filter(|op| op.signed) {
        let response = app
            .anonymous
            .request(op.method.clone(), format!("{}{}", app.address, op.path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{} {}", op.method, op.path);
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], "unauthorized",
            "{} {}",
            op.method, op.path
        );
    }
    for op in operations
        .iter()
        .filter(|op| op.scope.is_none() && !op.signed)
    {
        assert!(
            op.template.starts_with("/health") || !op.template.starts_with("/api/"),
            "{} is open but under /api",
            op.template
        );
        let status = call(&app, &op.method, &op.path, None).await;
        assert_eq!(status, 200, "{} {} is open", op.method, op.path);
    }
    // Even a route that does not exist says nothing without a credential.
    assert_eq!(call(&app, &Method::GET, "/api/v1/nope", None).await, 401);
    assert_eq!(
        call(&app, &Method::GET, "/api/v1/nope", Some(ADMIN_TOKEN)).await,
        404
    );
}

#[tokio::test]
async fn a_key_without_an_operations_scope_gets_403_and_a_key_with_only_that_scope_gets_through() {
    let app = spawn_app().await;
    let operations = operations_of(&app).await;
    let mut only = std::collections::HashMap::new();
    let mut all_but = std::collections::HashMap::new();
    for scope in SCOPES {
        only.insert(scope, app.api_key(&format!("only {scope}"), &[scope]).await);
        let others: Vec<&str> = SCOPES.iter().copied().filter(|s| *s != scope).collect();
        all_but.insert(
            scope,
            app.api_key(&format!("all but {scope}"), &others).await,
        );
    }

    let mut checked = 0;
    for op in &operations {
        let Some(scope) = op.scope.as_deref() else {
            continue;
        };
        let scope = SCOPES
            .into_iter()
            .find(|s| *s == scope)
            .unwrap_or_else(|| panic!("{} {}: unknown scope {scope}", op.method, op.path));
        let refused = if op.alternatives.len() > 1 {
            let others: Vec<&str> = SCOPES
                .into_iter()
                .filter(|s| !op.alternatives.iter().any(|a| a == s))
                .collect();
            let key = app.api_key("none of the alternatives", &others).await;
            for alternative in &op.alternatives {
                let key = app
                    .api_key("one alternative", &[alternative.as_str()])
                    .await;
                let allowed = call(&app, &op.method, &op.path, Some(&key)).await;
                assert!(
                    allowed != 401 && allowed != 403,
                    "{} {} with {alternative}: {allowed}",
                    op.method,
                    op.path
                );
            }
            call(&app, &op.method, &op.path, Some(&key)).await
        } else {
            call(&app, &op.method, &op.path, Some(&all_but[scope])).await
        };
        assert_eq!(refused, 403, "{} {} without {scope}", op.method, op.path);
        let allowed = call(&app, &op.method, &op.path, Some(&only[scope])).await;
        assert!(
            allowed != 401 && allowed != 403,
            "{} {} with {scope}: {allowed}",
            op.method,
            op.path
        );
        checked += 1;
    }
    assert!(checked > 25, "checked {checked} operations");
}

#[tokio::test]
async fn a_user_token_reaches_only_its_own_users_routes() {
    let app = spawn_app().await;
    let own = app.user_token(7);

    for op in operations_of(&app).await {
        let Some(_) = op.scope else { continue };
        if op.user_token {
            let mine = call(&app, &op.method, &as_user(&op, 7), Some(&own)).await;
            assert!(
                mine != 401 && mine != 403,
                "{} {} as its own user: {mine}",
                op.method,
                op.template
            );
            let theirs = call(&app, &op.method, &as_user(&op, 8), Some(&own)).await;
            assert_eq!(theirs, 403, "{} {} as another user", op.method, op.template);
        } else {
            let status = call(&app, &op.method, &as_user(&op, 7), Some(&own)).await;
            assert_eq!(
                status, 403,
                "{} {}: not a user route",
                op.method, op.template
            );
        }
    }
}

/// A JWT with the given header and claims, signed HS256 with `secret`.
fn jwt(header: &Value, claims: &Value, secret: &str) -> String {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let encode = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let input = format!("{}.{}", encode(header), encode(claims));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    let signature =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{input}.{signature}")
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[tokio::test]
async fn forged_expired_and_unsigned_user_tokens_get_401_and_the_stream_takes_a_token_query() {
    let app = spawn_app().await;
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let valid = json!({"sub": "7", "exp": now() + 600});
    let inbox = "/api/v1/users/7/inbox";

    let good = jwt(&hs256, &valid, USER_TOKEN_SECRET);
    let forged = jwt(
        &hs256,
        &valid,
        "not-the-secret-not-the-secret-not-the-secret",
    );
    let expired = jwt(
        &hs256,
        &json!({"sub": "7", "exp": now() - 30}),
        USER_TOKEN_SECRET,
    );
    let no_exp = jwt(&hs256, &json!({"sub": "7"}), USER_TOKEN_SECRET);
    let hs512 = jwt(&json!({"alg": "HS512"}), &valid, USER_TOKEN_SECRET);
    let unsigned = {
        use base64::Engine;
        let encode =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.", encode(&json!({"alg": "none"})), encode(&valid))
    };

    assert_eq!(call(&app, &Method::GET, inbox, Some(&good)).await, 200);
    for (what, token) in [
        ("forged", &forged),
        ("expired", &expired),
        ("without exp", &no_exp),
        ("HS512", &hs512),
        ("alg none", &unsigned),
    ] {
        assert_eq!(
            call(&app, &Method::GET, inbox, Some(token)).await,
            401,
            "{what}"
        );
    }

    let stream = |token: &str| format!("/api/v1/users/7/inbox/stream?token={token}");
    assert_eq!(call(&app, &Method::GET, &stream(&good), None).await, 200);
    assert_eq!(call(&app, &Method::GET, &stream(&forged), None).await, 401);
    assert_eq!(
        call(&app, &Method::GET, &stream(&app.user_token(8)), None).await,
        403
    );
    // The query token is for the stream only.
    assert_eq!(
        call(&app, &Method::GET, &format!("{inbox}?token={good}"), None).await,
        401
    );
}

#[tokio::test]
async fn a_revoked_key_is_refused_at_once_here_and_within_seconds_on_another_instance() {
    let app = spawn_app().await;
    let other = spawn_app_on(app.settings.clone(), &[Role::Api]).await;
    let key = app.api_key("soon revoked", &["dashboard:read"]).await;
    let path = "/api/v1/dashboard/delivery/channels";
    assert_eq!(call(&app, &Method::GET, path, Some(&key)).await, 200);
    assert_eq!(call(&other, &Method::GET, path, Some(&key)).await, 200);

    let listed: Value = app
        .http
        .get(format!("{}/api/v1/admin/keys", app.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "soon revoked")
        .expect("the key is listed")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !listed.to_string().contains(&key),
        "a listing never shows a key"
    );
    let revoked = app
        .http
        .delete(format!("{}/api/v1/admin/keys/{id}", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let revoked_at = Instant::now();

    assert_eq!(call(&app, &Method::GET, path, Some(&key)).await, 401);
    wait_until(5, "the other instance refuses the revoked key", || async {
        call(&other, &Method::GET, path, Some(&key)).await == 401
    })
    .await;
    println!(
        "revocation reached the other instance in {} ms",
        revoked_at.elapsed().as_millis()
    );
}

#[tokio::test]
async fn keys_are_made_with_known_scopes_and_never_with_more_than_their_maker_holds() {
    let app = spawn_app().await;
    let keys_admin = app.api_key("key maker", &["keys:admin"]).await;
    let post = |bearer: String, body: Value| {
        let app = &app;
        async move {
            app.anonymous
                .post(format!("{}/api/v1/admin/keys", app.address))
                .bearer_auth(bearer)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };

    let escalation = post(
        keys_admin.clone(),
        json!({"name": "sneaky", "scopes": ["dlq:admin"]}),
    )
    .await;
    assert_eq!(escalation.status(), 403);
    let unknown = post(
        ADMIN_TOKEN.to_owned(),
        json!({"name": "x", "scopes": ["notifications:delete"]}),
    )
    .await;
    assert_eq!(unknown.status(), 400);
    let body: Value = unknown.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("notifications:delete")
    );
    let none = post(ADMIN_TOKEN.to_owned(), json!({"name": "x", "scopes": []})).await;
    assert_eq!(none.status(), 400);

    let made = post(
        ADMIN_TOKEN.to_owned(),
        json!({"name": "billing", "scopes": ["notifications:write"]}),
    )
    .await;
    assert_eq!(made.status(), 201);
    assert_eq!(made.headers()["cache-control"], "no-store");
    let made: Value = made.json().await.unwrap();
    assert!(made["key"].as_str().unwrap().starts_with("hrk_"));
    assert_eq!(made["scopes"], json!(["notifications:write"]));
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE name = 'billing'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        stored,
        herald::auth::digest(made["key"].as_str().unwrap()).to_vec(),
        "only the digest is stored"
    );
}

#[tokio::test]
async fn an_idempotency_key_belongs_to_its_credential_and_expires() {
    let app = spawn_app_with(|s| s.access.idempotency_ttl = Duration::from_secs(2)).await;
    let billing = app.api_key("billing", &["notifications:write"]).await;
    let orders = app.api_key("orders", &["notifications:write"]).await;
    let send = |bearer: String, subject: &'static str| {
        let app = &app;
        async move {
            let response = app
                .anonymous
                .post(format!("{}/api/v1/notifications", app.address))
                .bearer_auth(bearer)
                .header("Idempotency-Key", "order-1")
                .json(
                    &json!({"userId": 5, "channels": ["IN_APP"], "subject": subject, "body": "b"}),
                )
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body["notificationId"].as_str().map(str::to_owned))
        }
    };

    let (first, a) = send(billing.clone(), "from billing").await;
    let (second, b) = send(orders.clone(), "from orders").await;
    assert_eq!(
        (first, second),
        (202, 202),
        "two credentials, one key: two requests"
    );
    assert_ne!(a, b);
    let (replayed, c) = send(billing.clone(), "from billing").await;
    assert_eq!(
        (replayed, c),
        (202, a.clone()),
        "the same credential replays"
    );
    let (reused, _) = send(billing.clone(), "another body").await;
    assert_eq!(reused, 422);

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (fresh, d) = send(billing, "another body").await;
    assert_eq!(fresh, 202, "past its TTL the key is new again");
    assert_ne!(d, a);
    let pruned = herald::intake::prune_idempotency_keys(&app.db, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(pruned >= 1, "the expired key of orders is pruned");
}

#[tokio::test]
async fn a_broadcast_records_the_names_of_the_credentials_that_made_and_cancelled_it() {
    let app = spawn_app().await;
    let jane = app
        .api_key("ops-jane", &["broadcasts:write", "broadcasts:read"])
        .await;
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let created: Value = app
        .anonymous
        .post(format!("{}/api/v1/broadcasts", app.address))
        .bearer_auth(&jane)
        .header("X-Operator", "mallory")
        .json(&json!({
            "audience": {"userIds": [1, 2]}, "channels": ["IN_APP"],
            "subject": "s", "body": "b", "scheduledAt": tomorrow
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["broadcastId"].as_str().unwrap();
    assert_eq!(created["createdBy"], "ops-jane");
    let cancelled: Value = app
        .http
        .post(format!("{}/api/v1/broadcasts/{id}/cancel", app.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["cancelledBy"], "admin");
}

#[tokio::test]
async fn failed_authentications_are_counted_by_reason_and_no_credential_reaches_the_metrics() {
    let app = spawn_app().await;
    let bogus = "hrk_0000000000000000000000000000000000000000000000000000000000000bad";
    assert_eq!(
        call(&app, &Method::GET, "/api/v1/broadcasts", Some(bogus)).await,
        401
    );
    assert_eq!(
        call(&app, &Method::GET, "/api/v1/broadcasts", None).await,
        401
    );

    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"herald_auth_failures_total{reason="unknown_key"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"herald_auth_failures_total{reason="missing"}"#));
    assert!(!metrics.contains(bogus));
    assert!(!metrics.contains(ADMIN_TOKEN));
}

#[tokio::test]
async fn bodies_must_be_json_and_cors_answers_only_the_configured_origins() {
    let app = spawn_app_with(|s| {
        s.access.cors_allowed_origins = vec!["https://app.example.com".to_owned()];
    })
    .await;
    let plain = app
        .http
        .post(format!("{}/api/v1/notifications", app.address))
        .header("content-type", "text/plain")
        .body(r#"{"userId": 1, "channels": ["IN_APP"], "subject": "s", "body": "b"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 415);
    let body: Value = plain.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_media_type");
    let settings = app
        .http
        .put(format!(
            "{}/api/v1/notifications/settings?userId=1",
            app.address
        ))
        .body(r#"{"channels": {"SMS": false}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(settings.status(), 415);

    let preflight = |origin: &'static str| {
        let app = &app;
        async move {
            app.anonymous
                .request(
                    Method::OPTIONS,
                    format!("{}/api/v1/users/1/inbox", app.address),
                )
                .header("origin", origin)
                .header("access-control-request-method", "GET")
                .header("access-control-request-headers", "authorization")
                .send()
                .await
                .unwrap()
        }
    };
    let allowed = preflight("https://app.example.com").await;
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let other = preflight("https://evil.example.com").await;
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn readiness_shows_driver_errors_only_to_an_operator() {
    let app = crate::helpers::spawn_app_as(&[Role::Api], |s| {
        s.kafka.brokers = "127.0.0.1:9".to_owned();
    })
    .await;
    let anonymous: Value = app
        .anonymous
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(anonymous["checks"]["kafka"]["status"], "down");
    assert!(
        anonymous["checks"]["kafka"].get("error").is_none(),
        "{anonymous}"
    );
    let operator: Value = app.get("/health/ready").await.json().await.unwrap();
    assert!(
        operator["checks"]["kafka"]["error"].is_string(),
        "{operator}"
    );
}

#[tokio::test]
async fn dispatch_keeps_sending_while_the_api_pool_is_exhausted() {
    let app = spawn_app_with(|s| s.database.api_max_connections = 2).await;
    // Every API connection held, as a flood of slow requests would.
    let held = [
        app.db.acquire().await.unwrap(),
        app.db.acquire().await.unwrap(),
    ];
    let observer = sqlx::PgPool::connect(herald_db_url(&app).as_str())
        .await
        .unwrap();

    let event = envelope(
        "PAYMENT_COMPLETED",
        77,
        json!({"orderId": "o-77", "amount": 1000, "currency": "KRW"}),
    );
    let event_id = event["eventId"].as_str().unwrap().to_owned();
    app.publish("fluxpay.payment.events", "77", event.to_string().as_bytes())
        .await;
    wait_until(60, "the event's in-app delivery is sent", || async {
        let status: Option<String> = sqlx::query_scalar(
            "SELECT d.status FROM deliveries d JOIN notifications n ON n.id = d.notification_id \
             WHERE n.event_id = $1 AND d.channel = 'IN_APP'",
        )
        .bind(&event_id)
        .fetch_optional(&observer)
        .await
        .unwrap();
        status.as_deref() == Some("SUCCESS")
    })
    .await;
    drop(held);
}

fn herald_db_url(app: &TestApp) -> String {
    app.settings.database_url().to_owned()
}

#[tokio::test]
async fn beyond_its_concurrency_bound_the_api_answers_503_at_once_and_a_stuck_request_times_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(|s| {
        s.http.max_concurrent_requests = 1;
        s.http.request_timeout = Duration::from_secs(2);
    })
    .await;
    // A request whose body never arrives holds the only slot.
    let addr = app.address.trim_start_matches("http://").to_owned();
    let mut stuck = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/notifications HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    stuck.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let busy = app
        .http
        .get(format!("{}/api/v1/broadcasts", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(busy.status(), 503);
    assert_eq!(busy.headers()["retry-after"], "1");
    let body: Value = busy.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    assert_eq!(
        app.get("/health/live").await.status(),
        200,
        "health is not bounded"
    );

    let mut answer = vec![0; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), stuck.read(&mut answer))
        .await
        .expect("the stuck request is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("timeout"), "{answer}");
    assert_eq!(
        app.get("/api/v1/broadcasts").await.status(),
        200,
        "the slot is free again"
    );
}

#[tokio::test]
async fn metrics_move_to_their_own_listener_when_one_is_configured() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = crate::helpers::spawn_app_as(&[Role::Api], |s| {
        s.http.metrics_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    })
    .await;
    assert_eq!(app.get("/metrics").await.status(), 404);
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().await.unwrap().contains("# TYPE"));
}
