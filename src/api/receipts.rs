//! Provider receipts over HTTP (issue 15): `POST /api/v1/receipts/{channel}` for `sms`,
//! `kakaotalk`, `push` and `email`.
//!
//! A provider holds no API key: each receipt is signed the Standard Webhooks way with the
//! channel's secret (`HERALD_SMS_RECEIPT_SECRET`, ...; `whsec_<base64>`): `webhook-id`
//! (unique per receipt), `webhook-timestamp` (Unix seconds, within 5 minutes of now) and
//! `webhook-signature` (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`). The
//! authentication middleware leaves this route to that check. Answers:
//! - 200 `{"deliveryId", "applied": true, "suppressed", "receipt"}`, or `"applied": false`
//!   when a receipt with a later provider time was applied already;
//! - 401 when the signature is missing, wrong or stale, or the channel takes no receipts;
//! - 404 `unknown_message` when no delivery has the message id (kept 10 minutes and applied
//!   if the send is recorded meanwhile);
//! - 409 `replayed` for a `webhook-id` received before; 400 for a body it cannot read.
//!
//! Bodies: a gateway's `{"messageId", "status": "DELIVERED" | "UNDELIVERED", "reason",
//! "permanent", "occurredAt"}`; for email, a bounce notification `{"messageId",
//! "bounceType": "hard" | "soft", "reason", "occurredAt"}` (or a `status`), or a delivery
//! status notification (RFC 3464) as `multipart/report` or `message/delivery-status` text.

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    AppState,
    error::{ApiError, ApiPath, BadRequest, Conflict, ErrorBody, Unauthorized},
};
use crate::{
    domain::{Channel, ReceiptStatus},
    receipts::{self, Accepted, Receipt, ReceiptState},
};

/// Whether a request is for the receipt route, which the authentication middleware leaves to
/// the signature check: exactly `POST /api/v1/receipts/{channel}`.
pub fn is_receipt_route(method: &axum::http::Method, path: &str) -> bool {
    method == axum::http::Method::POST
        && path
            .strip_prefix("/api/v1/receipts/")
            .is_some_and(|channel| !channel.is_empty() && !channel.contains('/'))
}

/// The receipt route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(receive))
}

/// A gateway's receipt, or an email provider's bounce notification, as JSON. Fields it does
/// not know are ignored: providers add their own, and refusing them would lose the receipt.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Receipt)]
struct Body {
    message_id: String,
    status: Option<String>,
    /// Email: `hard` or `soft`.
    bounce_type: Option<String>,
    reason: Option<String>,
    permanent: Option<bool>,
    occurred_at: Option<DateTime<Utc>>,
}

/// What became of a receipt.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
#[schema(as = ReceiptResult)]
enum Answer {
    Applied(Applied),
    Superseded(Superseded),
}

/// The receipt was applied to its delivery.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ReceiptApplied)]
struct Applied {
    delivery_id: Uuid,
    /// Always true.
    applied: bool,
    /// The receipt suppressed the address.
    suppressed: bool,
    receipt: ReceiptState,
}

/// A receipt with a later provider time was applied to the delivery already.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ReceiptSuperseded)]
struct Superseded {
    delivery_id: Uuid,
    /// Always false.
    applied: bool,
    reason: &'static str,
}

/// A provider's receipt (delivered, undelivered, bounced), signed the Standard Webhooks
/// way with the channel's receipt secret. For email, also a delivery status notification
/// (RFC 3464) as `multipart/report` or `message/delivery-status` text.
#[utoipa::path(
    post,
    path = "/api/v1/receipts/{channel}",
    operation_id = "postReceipt",
    tag = "receipts",
    params(("channel" = String, Path, description = "`sms`, `kakaotalk`, `push` or `email`.")),
    request_body(content(
        (Body = "application/json"),
        (String = "multipart/report"),
        (String = "message/delivery-status"),
    )),
    security(("receiptSignature" = [])),
    responses(
        (status = 200, description = "Applied, or superseded by a later receipt.", body = Answer),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, description = "`unknown_message`: no delivery has the message id (kept 10 minutes and applied if the send is recorded meanwhile).", body = ErrorBody),
        (status = 409, response = Conflict),
    )
)]
async fn receive(
    State(state): State<AppState>,
    ApiPath(channel): ApiPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // An unknown channel is refused like a bad signature: nothing is learnt without one.
    let channel = match channel.to_ascii_lowercase().as_str() {
        "sms" => Some(Channel::Sms),
        "kakaotalk" => Some(Channel::Kakaotalk),
        "push" => Some(Channel::Push),
        "email" => Some(Channel::Email),
        _ => None,
    };
    let channel = verify(&state, channel, &headers, &body)?;
    let webhook_id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let (provider_ref, receipt_state) = read_body(channel, &headers, &body)?;
    let receipt = Receipt {
        channel,
        webhook_id,
        provider_ref,
        state: receipt_state,
    };
    let accepted = receipts::accept(
        &state.db,
        &receipt,
        None,
        &state.settings.kafka.topic_prefix,
    )
    .await?;
    Ok(match accepted {
        Accepted::Applied {
            delivery_id,
            suppressed,
        } => Json(Answer::Applied(Applied {
            delivery_id,
            applied: true,
            suppressed,
            receipt: receipt.state,
        }))
        .into_response(),
        Accepted::Superseded { delivery_id } => Json(Answer::Superseded(Superseded {
            delivery_id,
            applied: false,
            reason: "a receipt with a later time was applied to this delivery already",
        }))
        .into_response(),
        Accepted::Unmatched => error(
            StatusCode::NOT_FOUND,
            "unknown_message",
            format!(
                "no {channel} delivery has the message id {:?}; the receipt is kept for {} minutes and applied if its send is recorded meanwhile",
                receipt.provider_ref,
                receipts::UNMATCHED_FOR.as_secs() / 60
            ),
        ),
        Accepted::Replayed => error(
            StatusCode::CONFLICT,
            "replayed",
            "this webhook-id was received before; the receipt is not applied again".to_owned(),
        ),
    })
}

fn error(status: StatusCode, code: &'static str, message: String) -> Response {
    (status, Json(ErrorBody::new(code, message))).into_response()
}

/// Checks the Standard Webhooks signature with the channel's secret; the channel when it
/// holds.
fn verify(
    state: &AppState,
    channel: Option<Channel>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Channel, ApiError> {
    let refused = |why: &str| {
        let label = channel.map_or("unknown", Channel::as_str);
        metrics::counter!("herald_receipts_refused_total", "channel" => label).increment(1);
        ApiError::Unauthorized(format!(
            "a receipt needs a valid Standard Webhooks signature (webhook-id, webhook-timestamp within 5 minutes, webhook-signature) made with the receipt secret of its channel (sms, kakaotalk, push or email): {why}"
        ))
    };
    let Some((channel, secret)) =
        channel.and_then(|c| Some((c, state.settings.channels.receipt_secrets.get(&c)?)))
    else {
        return Err(refused("signature invalid"));
    };
    let webhook = standardwebhooks::Webhook::new(secret.expose_secret())
        .map_err(|_| refused("signature invalid"))?;
    webhook.verify(body, headers).map_err(|e| {
        use standardwebhooks::WebhookError as E;
        refused(match e {
            E::TimestampTooOldError => "the timestamp is too old",
            E::FutureTimestampError => "the timestamp is in the future",
            E::MissingHeader(_) | E::InvalidHeader(_) | E::InvalidTimestamp => {
                "a signature header is missing or malformed"
            }
            _ => "signature invalid",
        })
    })?;
    Ok(channel)
}

/// The message id and receipt state a body carries.
fn read_body(
    channel: Channel,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, ReceiptState), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase();
    if channel == Channel::Email
        && (content_type.starts_with("multipart/report")
            || content_type.starts_with("message/delivery-status"))
    {
        let text = String::from_utf8_lossy(body);
        return receipts::dsn::parse(&text).map_err(ApiError::BadRequest);
    }
    let body: Body = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("the receipt is not valid: {e}")))?;
    let message_id = body.message_id.replace('\0', "");
    let message_id = message_id.trim();
    if message_id.is_empty() || message_id.len() > 256 {
        return Err(ApiError::BadRequest(
            "messageId: must be 1 to 256 characters".to_owned(),
        ));
    }
    let hard = match body.bounce_type.as_deref().map(str::to_ascii_lowercase) {
        None => None,
        Some(t) if t == "hard" || t == "permanent" => Some(true),
        Some(t) if t == "soft" || t == "transient" => Some(false),
        Some(t) => {
            return Err(ApiError::BadRequest(format!(
                "bounceType: {t:?} is neither hard nor soft"
            )));
        }
    };
    let status = match (&body.status, hard) {
        (Some(s), _) => s.parse::<ReceiptStatus>().map_err(ApiError::BadRequest)?,
        (None, Some(_)) if channel == Channel::Email => ReceiptStatus::Bounced,
        _ => {
            return Err(ApiError::BadRequest(
                "status: is required (DELIVERED or UNDELIVERED; for email, a bounceType makes it BOUNCED)".to_owned(),
            ));
        }
    };
    if status == ReceiptStatus::Bounced && channel != Channel::Email {
        return Err(ApiError::BadRequest(
            "status: BOUNCED is for email; a gateway reports UNDELIVERED with a reason".to_owned(),
        ));
    }
    let reason = body
        .reason
        .map(|r| r.replace('\0', "").chars().take(1000).collect::<String>());
    let provider_ref = if channel == Channel::Email {
        receipts::dsn::delivery_id_in(message_id)
            .map(|id| id.to_string())
            .unwrap_or_else(|| message_id.to_owned())
    } else {
        message_id.to_owned()
    };
    Ok((
        provider_ref,
        ReceiptState {
            status,
            permanent: status != ReceiptStatus::Delivered
                && (hard.or(body.permanent).unwrap_or(false)),
            reason,
            at: body.occurred_at.unwrap_or_else(Utc::now),
        },
    ))
}
