//! `GET /api/v1/admin/alerts`: the delivery-health alerts Herald evaluates itself
//! ([`crate::alerts`]), each with its state (ok, pending, firing), value, threshold, since
//! when, and what the ops Slack was last told. For operators (`dlq:admin`) and analysts
//! (`dashboard:read`).

use axum::{Json, extract::State, http::Method};
use serde::Serialize;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::{
    AppState,
    auth::{Need, Rules, guarded},
    error::ApiError,
};
use crate::{
    alerts::{self, AlertView, Rule},
    auth::Scope,
};

/// The alerts route, needing `dashboard:read` or `dlq:admin`.
pub fn router() -> OpenApiRouter<AppState> {
    const RULES: Rules = &[(
        Method::GET,
        Need::AnyScope(&[Scope::DashboardRead, Scope::DlqAdmin]),
    )];
    guarded(OpenApiRouter::new().routes(routes!(list)), RULES)
}

/// The answer: the rules as configured, and every alert as last evaluated.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertsReport {
    enabled: bool,
    interval_seconds: f64,
    rules: Vec<RuleView>,
    alerts: Vec<AlertView>,
}

/// One rule as configured.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = AlertRule)]
pub struct RuleView {
    alert: &'static str,
    severity: &'static str,
    threshold: f64,
    window_seconds: Option<f64>,
    for_seconds: f64,
    resolve_after_seconds: f64,
}

/// The delivery-health alerts Herald evaluates itself, each with its state (ok, pending,
/// firing), value, threshold, since when, and what the ops Slack was last told.
#[utoipa::path(
    get,
    path = "/api/v1/admin/alerts",
    operation_id = "listAlerts",
    tag = "admin",
    responses((status = 200, description = "The rules and the alerts.", body = AlertsReport))
)]
async fn list(State(state): State<AppState>) -> Result<Json<AlertsReport>, ApiError> {
    let settings = &state.settings.alerts;
    let rules = Rule::ALL
        .into_iter()
        .map(|rule| {
            let timing = rule.timing(settings);
            RuleView {
                alert: rule.name(),
                severity: rule.severity(),
                threshold: rule.threshold(settings),
                window_seconds: rule.window(settings).map(|w| w.as_secs_f64()),
                for_seconds: timing.fire_after.as_secs_f64(),
                resolve_after_seconds: timing.resolve_after.as_secs_f64(),
            }
        })
        .collect();
    Ok(Json(AlertsReport {
        enabled: settings.enabled,
        interval_seconds: settings.interval.as_secs_f64(),
        rules,
        alerts: alerts::list(&state.db).await?,
    }))
}
