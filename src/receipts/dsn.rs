//! Email bounces as delivery status notifications (RFC 3464), for plain SMTP setups: the
//! bounce a mail server sends back, posted to the email receipt route as it came.
//!
//! Only what a receipt needs is read, line by line (headers unfolded): the per-recipient
//! `Action` (`failed`, `delayed`, `delivered`), `Status` (`5.x.x` is permanent, a hard
//! bounce; `4.x.x` transient, a soft one), `Diagnostic-Code` for the reason, and the
//! delivery the bounce is about, found by the Message-ID Herald gave the email
//! (`<{delivery id}@herald>`) in the returned headers.

use chrono::Utc;
use uuid::Uuid;

use super::ReceiptState;
use crate::domain::ReceiptStatus;

/// The delivery id in a Message-ID Herald made (`<{id}@herald>`, with or without the angle
/// brackets), or a bare delivery id.
pub fn delivery_id_in(message_id: &str) -> Option<Uuid> {
    let inner = message_id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    let local = inner.strip_suffix("@herald").unwrap_or(inner);
    local.parse().ok()
}

/// The delivery id (as text) and receipt state of a DSN; an error says what is missing.
pub fn parse(text: &str) -> Result<(String, ReceiptState), String> {
    let fields = unfolded(text);
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let delivery = fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Message-ID"))
        .find_map(|(_, v)| delivery_id_in(v))
        .ok_or("the report names no email Herald sent: no Message-ID <{delivery id}@herald> in its returned headers")?;
    let action = field("Action")
        .ok_or("the report has no Action field (a delivery-status part is required)")?
        .to_ascii_lowercase();
    let status_code = field("Status").unwrap_or_default();
    let (status, permanent) = match action.as_str() {
        "delivered" | "relayed" | "expanded" => (ReceiptStatus::Delivered, false),
        // Permanent only when the status says so (5.x.x): a failure without one may pass.
        "failed" => (ReceiptStatus::Bounced, status_code.starts_with('5')),
        "delayed" => (ReceiptStatus::Bounced, false),
        other => {
            return Err(format!(
                "the report's Action {other:?} is not one RFC 3464 defines"
            ));
        }
    };
    let reason = field("Diagnostic-Code")
        .map(|d| {
            d.split_once(';')
                .map(|(_, r)| r.trim())
                .unwrap_or(d)
                .replace('\0', "")
        })
        .or_else(|| (!status_code.is_empty()).then(|| format!("status {status_code}")));
    Ok((
        delivery.to_string(),
        ReceiptState {
            status,
            reason: if status == ReceiptStatus::Delivered {
                None
            } else {
                reason
            },
            permanent,
            at: Utc::now(),
        },
    ))
}

/// Every `Name: value` line of the text, continuation lines joined to theirs.
fn unfolded(text: &str) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':')
            && !name.is_empty()
            && !name.contains(' ')
        {
            fields.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNCE: &str = "From: MAILER-DAEMON@mx.example.com\r
Message-ID: <20261202.abc@mx.example.com>\r
Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r
\r
--b\r
Content-Type: text/plain\r
\r
Your message could not be delivered.\r
--b\r
Content-Type: message/delivery-status\r
\r
Reporting-MTA: dns; mx.example.com\r
\r
Final-Recipient: rfc822; gone@example.com\r
Action: failed\r
Status: 5.1.1\r
Diagnostic-Code: smtp; 550 5.1.1 <gone@example.com>:\r
 user unknown\r
--b\r
Content-Type: text/rfc822-headers\r
\r
Message-ID: <0193a4f2-7c1e-7b3a-9d2e-5f6a7b8c9d0e@herald>\r
Subject: payment\r
--b--\r
";

    #[test]
    fn a_failed_5xx_report_is_a_hard_bounce_of_the_delivery_its_returned_headers_name() {
        let (delivery, state) = parse(BOUNCE).unwrap();
        assert_eq!(delivery, "0193a4f2-7c1e-7b3a-9d2e-5f6a7b8c9d0e");
        assert_eq!(state.status, ReceiptStatus::Bounced);
        assert!(state.permanent);
        assert_eq!(
            state.reason.as_deref(),
            Some("550 5.1.1 <gone@example.com>: user unknown")
        );
    }

    #[test]
    fn a_4xx_failure_or_a_delay_is_a_soft_bounce() {
        let soft = BOUNCE.replace("Status: 5.1.1", "Status: 4.2.2");
        assert!(!parse(&soft).unwrap().1.permanent);
        let delayed = BOUNCE.replace("Action: failed", "Action: delayed");
        let (_, state) = parse(&delayed).unwrap();
        assert_eq!(state.status, ReceiptStatus::Bounced);
        assert!(!state.permanent);
    }

    #[test]
    fn a_report_without_herald_s_message_id_or_an_action_is_refused_with_the_reason() {
        let foreign = BOUNCE.replace("-5f6a7b8c9d0e@herald", "@elsewhere");
        assert!(parse(&foreign).unwrap_err().contains("Message-ID"));
        let no_action = BOUNCE.replace("Action: failed\r\n", "");
        assert!(parse(&no_action).unwrap_err().contains("Action"));
    }
}
