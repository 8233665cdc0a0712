//! The delivery-health alerts Herald evaluates itself (src/alerts): fired and resolved
//! once each on the ops Slack, visible at GET /api/v1/admin/alerts, with short windows
//! instead of the production minutes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use herald::{config::Settings, roles::Role};
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers::method};

use crate::helpers::{slack_mock, slack_url, spawn_app, spawn_app_on, spawn_app_with, wait_until};

/// An SMS gateway that fails one request in five (500) until told to be healthy.
struct OneInFiveFails {
    requests: AtomicUsize,
    healthy: Arc<AtomicBool>,
}

impl Respond for OneInFiveFails {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.requests.fetch_add(1, Ordering::SeqCst);
        if !self.healthy.load(Ordering::SeqCst) && n % 5 == 4 {
            return ResponseTemplate::new(500).set_body_string("gateway hiccup");
        }
        ResponseTemplate::new(200).set_body_json(json!({ "messageId": Uuid::new_v4() }))
    }
}

/// The texts the Slack double received.
async fn slack_texts(slack: &MockServer) -> Vec<String> {
    slack
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
        .filter_map(|body| body["text"].as_str().map(str::to_owned))
        .collect()
}

fn count(texts: &[String], needle: &str) -> usize {
    texts.iter().filter(|t| t.contains(needle)).count()
}

/// Rounds every second over windows of seconds; the other rules out of reach. A firing
/// alert resolves only after 6 s clear: on a machine busy with the whole suite, a few
/// seconds without enough sends read as clear, and a shorter hold let a firing alert
/// resolve and turn pending again before the test looked at it.
fn fast_alerts(s: &mut Settings) {
    let a = &mut s.alerts;
    a.enabled = true;
    a.interval = Duration::from_secs(1);
    a.resolve_after = Duration::from_secs(6);
    a.success_rate_window = Duration::from_secs(6);
    a.success_rate_for = Duration::from_secs(2);
    a.success_rate_min_sends_per_second = 0.5;
    a.pending_max = 100_000;
    a.send_p99_max = Duration::from_secs(60);
}

async fn alert_of(app: &crate::helpers::TestApp, name: &str, subject: &str) -> Option<Value> {
    let response = app.get("/api/v1/admin/alerts").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alert"] == name && a["subject"] == subject)
        .cloned()
}

#[tokio::test]
async fn a_channel_failing_a_fifth_of_its_sends_fires_once_on_the_ops_slack_and_resolves_once() {
    let healthy = Arc::new(AtomicBool::new(false));
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(OneInFiveFails {
            requests: AtomicUsize::new(0),
            healthy: healthy.clone(),
        })
        .mount(&gateway)
        .await;
    let slack = slack_mock(&[(200, None)]).await;
    let (sms, ops) = (format!("{}/sms", gateway.uri()), slack_url(&slack));
    let app = spawn_app_with(move |s| {
        s.channels.sms_gateway_url = Some(sms.parse().unwrap());
        s.channels.slack_webhook_url = Some(ops.into());
        s.dispatch.backoff = vec![Duration::from_millis(50)];
        fast_alerts(s);
    })
    .await;
    // A second evaluator on the same database: still one announcement per transition.
    let _second = spawn_app_on(app.settings.clone(), &[Role::Relay]).await;

    // Steady SMS traffic for the whole test, about ten a second.
    let sending = {
        let (http, address) = (app.http.clone(), app.address.clone());
        tokio::spawn(async move {
            for i in 0.. {
                let request = json!({ "recipient": { "phone": "+821012345678" },
                    "channels": ["SMS"], "subject": "s", "body": format!("b{i}") });
                let response = http
                    .post(format!("{address}/api/v1/notifications"))
                    .json(&request)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    wait_until(60, "the success-rate alert fires on Slack", || async {
        count(&slack_texts(&slack).await, "FIRING") > 0
    })
    .await;
    // A round posts before it commits (it records the announcement in its transaction), so
    // the state is read once that round's transaction is visible.
    wait_until(10, "the round that announced it committed", || async {
        alert_of(&app, "HeraldChannelSuccessRateLow", "SMS")
            .await
            .is_some_and(|alert| alert["lastAnnounced"] == "firing")
    })
    .await;
    let alert = alert_of(&app, "HeraldChannelSuccessRateLow", "SMS")
        .await
        .expect("the SMS success rate is listed");
    assert_eq!(alert["state"], "firing", "{alert}");
    assert_eq!(alert["lastAnnounced"], "firing", "{alert}");
    assert_eq!(alert["severity"], "page", "{alert}");
    assert_eq!(alert["threshold"], 0.9, "{alert}");
    let value = alert["value"].as_f64().unwrap();
    assert!((0.6..0.9).contains(&value), "about 80 % succeed: {alert}");

    healthy.store(true, Ordering::SeqCst);
    wait_until(60, "the recovery is announced on Slack", || async {
        count(&slack_texts(&slack).await, "RESOLVED") > 0
    })
    .await;
    // More rounds, on both instances, with the channel healthy: nothing more is said.
    tokio::time::sleep(Duration::from_secs(5)).await;
    sending.abort();

    let texts = slack_texts(&slack).await;
    assert_eq!(count(&texts, "FIRING"), 1, "{texts:#?}");
    assert_eq!(count(&texts, "RESOLVED"), 1, "{texts:#?}");
    assert_eq!(texts.len(), 2, "only the two announcements: {texts:#?}");
    let firing = texts.iter().find(|t| t.contains("FIRING")).unwrap();
    assert!(
        firing.contains("HeraldChannelSuccessRateLow (SMS)")
            && firing.contains("[page]")
            && firing.contains("90.0 %")
            && firing.contains("Runbook:"),
        "{firing}"
    );
    let alert = alert_of(&app, "HeraldChannelSuccessRateLow", "SMS")
        .await
        .unwrap();
    assert_eq!(alert["state"], "ok", "{alert}");
    assert_eq!(alert["lastAnnounced"], "resolved", "{alert}");
    assert!(alert["value"].as_f64().unwrap() >= 0.9, "{alert}");
}

#[tokio::test]
async fn the_pending_deliveries_alert_fires_over_its_threshold_and_an_unreachable_slack_is_retried()
{
    // Slack answers 500 twice, then accepts: the FIRING goes out on a later round, once.
    let slack = slack_mock(&[(500, Some(2)), (200, None)]).await;
    let ops = slack_url(&slack);
    let app = spawn_app_as_front(move |s| {
        s.channels.slack_webhook_url = Some(ops.into());
        fast_alerts(s);
        s.alerts.pending_max = 3;
        s.alerts.pending_for = Duration::ZERO;
    })
    .await;
    for i in 0..5 {
        let request =
            json!({ "userId": 7, "channels": ["IN_APP"], "subject": "s", "body": format!("b{i}") });
        let response = app.post_json("/api/v1/notifications", &request, &[]).await;
        assert_eq!(response.status(), 202);
    }
    wait_until(30, "the pending alert is announced", || async {
        count(&slack_texts(&slack).await, "FIRING") > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let texts = slack_texts(&slack).await;
    // Two refused posts, then the one that went out; no further ones.
    assert_eq!(texts.len(), 3, "{texts:#?}");
    assert!(
        texts
            .iter()
            .all(|t| t.contains("FIRING [page] HeraldPendingDeliveriesHigh")),
        "{texts:#?}"
    );
    let alert = alert_of(&app, "HeraldPendingDeliveriesHigh", "")
        .await
        .unwrap();
    assert_eq!(alert["state"], "firing", "{alert}");
    assert_eq!(alert["value"], 5.0, "{alert}");
    assert_eq!(alert["lastAnnounced"], "firing", "{alert}");
}

/// The API and the relay's alert round, but no dispatch: deliveries stay PENDING.
async fn spawn_app_as_front(customise: impl FnOnce(&mut Settings)) -> crate::helpers::TestApp {
    crate::helpers::spawn_app_as(&[Role::Api, Role::Relay], customise).await
}

#[tokio::test]
async fn the_alerts_need_dashboard_read_or_dlq_admin() {
    let app = spawn_app().await;
    let url = format!("{}/api/v1/admin/alerts", app.address);

    let anonymous = app.anonymous.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let body: Value = anonymous.json().await.unwrap();
    assert!(body["error"]["code"].is_string(), "{body}");

    let writer = app.api_key("writer", &["notifications:write"]).await;
    let refused = app
        .anonymous
        .get(&url)
        .bearer_auth(&writer)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");

    for scope in ["dashboard:read", "dlq:admin"] {
        let key = app.api_key(scope, &[scope]).await;
        let response = app
            .anonymous
            .get(&url)
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{scope}");
        let body: Value = response.json().await.unwrap();
        let rules: Vec<&str> = body["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["alert"].as_str().unwrap())
            .collect();
        assert_eq!(
            rules,
            [
                "HeraldChannelSuccessRateLow",
                "HeraldPendingDeliveriesHigh",
                "HeraldProviderSlow",
                "HeraldDeadLettersArriving"
            ],
            "{body}"
        );
        assert_eq!(body["rules"][0]["threshold"], 0.9, "{body}");
        assert_eq!(
            body["alerts"],
            json!([]),
            "nothing evaluated while off: {body}"
        );
    }
}
