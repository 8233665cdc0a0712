//! Times rendering each channel's message of one event type, the way a dispatcher does
//! (`cargo run --release --example render_probe -- [templates-dir] [EVENT_TYPE] [n]`).
//! Prints microseconds per render of the Slack message, the in-app title and body, and the
//! email's three parts, for both locales.

use std::{path::PathBuf, time::Instant};

use herald::{domain::Locale, templates::Templates};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "templates".into()));
    let event_type = args.next().unwrap_or_else(|| "PAYMENT_COMPLETED".into());
    let n: u32 = args.next().map_or(Ok(20_000), |s| s.parse())?;
    let templates = Templates::load(&dir)?;
    let mut context = tera::Context::new();
    context.insert(
        "data",
        &json!({"orderId": "o-1234", "amount": 12000, "currency": "KRW",
                "paymentMethod": "card", "paymentId": "p-99", "paidAt": "2026-12-03T10:00:00Z",
                "reason": "card declined"}),
    );
    context.insert("occurred_at", "2026-12-03T10:00:00Z");
    context.insert("notification_id", "0190-probe");
    for locale in [Locale::Ko, Locale::En] {
        let time = |what: &str, f: &dyn Fn() -> anyhow::Result<usize>| -> anyhow::Result<()> {
            let started = Instant::now();
            let mut bytes = 0;
            for _ in 0..n {
                bytes += f()?;
            }
            let per = started.elapsed().as_secs_f64() * 1e6 / f64::from(n);
            println!(
                "{locale} {what}: {per:.1} us per render ({} bytes)",
                bytes / n as usize
            );
            Ok(())
        };
        time("slack", &|| {
            Ok(templates
                .slack(locale, &event_type, &context)?
                .to_string()
                .len())
        })?;
        time("in-app", &|| {
            let s = templates.short(locale, &event_type, &context)?;
            Ok(s.title.len() + s.body.len())
        })?;
        time("email", &|| {
            let e = templates.email(locale, &event_type, &context)?;
            Ok(e.subject.len() + e.text.len() + e.html.len())
        })?;
    }
    Ok(())
}
