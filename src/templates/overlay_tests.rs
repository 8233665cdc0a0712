//! The overlay of API versions on the files, and the default-locale fallback.

use serde_json::json;

use super::*;

/// A template folder of its own in the temp dir, with `files` (path → source).
fn folder(files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herald-templates-{}", uuid::Uuid::new_v4()));
    for (path, source) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, source).unwrap();
    }
    dir
}

fn context(data: Value) -> tera::Context {
    let mut context = tera::Context::new();
    context.insert("data", &data);
    context
}

fn overlay(revision: i64, sources: &[(&str, &str)]) -> Overlay {
    Overlay {
        revision,
        sources: sources
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect(),
    }
}

#[test]
fn a_locale_without_a_part_falls_back_to_the_default_locale_for_that_part_only() {
    let dir = folder(&[
        (
            "en/ORDER_SHIPPED/in_app_title.txt",
            "Shipped {{ data.orderId }}",
        ),
        ("en/ORDER_SHIPPED/in_app_body.txt", "On its way"),
        ("ko/ORDER_SHIPPED/in_app_body.txt", "배송 중"),
    ]);
    let templates = Templates::load(&dir)
        .unwrap()
        .with_default_locale(Locale::En);
    let context = context(json!({ "orderId": "o-9" }));

    let short = templates
        .short(Locale::Ko, "ORDER_SHIPPED", &context)
        .unwrap();

    assert_eq!(short.title, "Shipped o-9", "the title comes from en");
    assert_eq!(short.body, "배송 중", "the body stays Korean");
    assert!(templates.covers("ORDER_SHIPPED", Channel::InApp));
    assert!(!templates.covers("ORDER_SHIPPED", Channel::Email));
}

#[test]
fn a_part_only_a_non_default_locale_has_does_not_cover_the_default_locale() {
    let dir = folder(&[
        ("ko/ORDER_SHIPPED/in_app_title.txt", "배송"),
        ("ko/ORDER_SHIPPED/in_app_body.txt", "배송 중"),
    ]);
    let templates = Templates::load(&dir)
        .unwrap()
        .with_default_locale(Locale::En);

    assert!(!templates.covers("ORDER_SHIPPED", Channel::InApp));
    let error = templates
        .short(Locale::En, "ORDER_SHIPPED", &context(json!({})))
        .unwrap_err();
    assert_eq!(error.template, "en/ORDER_SHIPPED/in_app_title.txt");
}

#[test]
fn an_overlay_version_replaces_its_file_and_can_extend_a_file_layout() {
    let dir = folder(&[
        (
            "_layouts/base.html",
            "<html>{% block content %}{% endblock content %}</html>",
        ),
        ("en/ORDER_SHIPPED/email_subject.txt", "Shipped"),
        ("en/ORDER_SHIPPED/email_text.txt", "text"),
        (
            "en/ORDER_SHIPPED/email_html.html",
            "{% extends \"_layouts/base.html\" %}",
        ),
    ]);
    let templates = Templates::load(&dir).unwrap();
    let context = context(json!({ "orderId": "o-1" }));

    templates.set_overlay(overlay(
        3,
        &[
            ("en/ORDER_SHIPPED/email_subject.txt", "Now shipped: {{ data.orderId }}"),
            (
                "en/ORDER_SHIPPED/email_html.html",
                "{% extends \"_layouts/base.html\" %}{% block content %}<b>{{ data.orderId }}</b>{% endblock content %}",
            ),
        ],
    ));
    let email = templates
        .email(Locale::En, "ORDER_SHIPPED", &context)
        .unwrap();

    assert_eq!(email.subject, "Now shipped: o-1");
    assert_eq!(email.html, "<html><b>o-1</b></html>");
    assert_eq!(templates.overlay_revision(), 3);

    // An older overlay (a slow poll) does not undo a newer one; an empty newer one does.
    templates.set_overlay(overlay(2, &[]));
    assert_eq!(
        templates
            .render(Locale::En, "ORDER_SHIPPED", Part::EmailSubject, &context)
            .unwrap(),
        "Now shipped: o-1"
    );
    templates.set_overlay(overlay(4, &[]));
    assert_eq!(
        templates
            .render(Locale::En, "ORDER_SHIPPED", Part::EmailSubject, &context)
            .unwrap(),
        "Shipped"
    );
}

#[test]
fn a_stored_version_that_does_not_parse_is_skipped_and_the_others_apply() {
    let dir = folder(&[
        ("en/ORDER_SHIPPED/in_app_title.txt", "file title"),
        ("en/ORDER_SHIPPED/in_app_body.txt", "file body"),
    ]);
    let templates = Templates::load(&dir).unwrap();

    templates.set_overlay(overlay(
        1,
        &[
            ("en/ORDER_SHIPPED/in_app_title.txt", "{{ broken"),
            ("en/ORDER_SHIPPED/in_app_body.txt", "api body"),
        ],
    ));
    let short = templates
        .short(Locale::En, "ORDER_SHIPPED", &context(json!({})))
        .unwrap();

    assert_eq!(short.title, "file title");
    assert_eq!(short.body, "api body");
}

#[test]
fn the_overlay_survives_a_reload_of_the_files() {
    let dir = folder(&[
        ("en/ORDER_SHIPPED/in_app_title.txt", "file title"),
        ("en/ORDER_SHIPPED/in_app_body.txt", "file body"),
    ]);
    let templates = Templates::load(&dir).unwrap();
    templates.set_overlay(overlay(
        1,
        &[("en/ORDER_SHIPPED/in_app_title.txt", "api title")],
    ));

    std::fs::write(dir.join("en/ORDER_SHIPPED/in_app_body.txt"), "edited body").unwrap();
    std::thread::sleep(RELOAD_CHECK + Duration::from_millis(50));
    let short = templates
        .short(Locale::En, "ORDER_SHIPPED", &context(json!({})))
        .unwrap();

    assert_eq!(short.title, "api title");
    assert_eq!(short.body, "edited body");
}

#[test]
fn a_render_error_names_the_template_and_the_missing_field() {
    let dir = folder(&[(
        "en/ORDER_SHIPPED/in_app_title.txt",
        "Shipped {{ data.orderId }}",
    )]);
    let templates = Templates::load(&dir).unwrap();

    let error = templates
        .render(
            Locale::En,
            "ORDER_SHIPPED",
            Part::InAppTitle,
            &context(json!({})),
        )
        .unwrap_err();

    let message = error.to_string();
    assert!(
        message.starts_with("template en/ORDER_SHIPPED/in_app_title.txt: "),
        "{message}"
    );
    assert!(message.contains("data.orderId"), "{message}");
}

#[test]
fn a_checked_slack_part_must_render_block_kit() {
    let dir = folder(&[(
        "en/SYSTEM_INCIDENT/slack.json",
        "{\"text\": \"x\", \"blocks\": []}",
    )]);
    let templates = Templates::load(&dir).unwrap();
    let contexts = [context(json!({ "title": "DB" }))];
    let check = |source: &str| {
        templates.check(
            Locale::En,
            "SYSTEM_INCIDENT",
            Part::Slack,
            source,
            &contexts,
        )
    };

    assert!(check("{\"text\": {{ data.title | json_encode() }}, \"blocks\": []}").is_ok());
    let not_json = check("Incident: {{ data.title }}").unwrap_err();
    assert!(not_json.reason.contains("valid JSON"), "{not_json}");
    let no_blocks = check("{\"text\": \"x\"}").unwrap_err();
    assert!(no_blocks.reason.contains("blocks"), "{no_blocks}");
    let syntax = check("{{ data.title").unwrap_err();
    assert_eq!(syntax.template, "en/SYSTEM_INCIDENT/slack.json");
    // Checking changed nothing.
    let message = templates
        .slack(Locale::En, "SYSTEM_INCIDENT", &contexts[0])
        .unwrap();
    assert_eq!(message["text"], "x");
}

#[test]
fn part_names_are_the_file_names_without_extension() {
    let names: Vec<&str> = Part::ALL.iter().map(|p| p.name()).collect();

    assert_eq!(
        names,
        [
            "email_subject",
            "email_text",
            "email_html",
            "slack",
            "in_app_title",
            "in_app_body"
        ]
    );
    assert_eq!(Part::from_name("slack"), Some(Part::Slack));
    assert_eq!(Part::from_name("slack.json"), None);
}
