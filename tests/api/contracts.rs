//! The contract between the event schemas (`schemas/`) and the templates (`templates/`):
//! every event an upstream team may send, as its schema allows it, renders on every
//! channel in both languages. Payloads come from the schemas' own examples (only the
//! required fields, then every field), so nothing here is hand-written per event type.
//!
//! These tests read files only: they need neither the test stack nor a running Herald.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use herald::{
    domain::{Channel, EventType, Locale},
    event_schemas::{ADHOC_SCHEMA, EventSchema, EventSchemas},
    routing::RoutingTable,
    templates::{
        ADHOC, EmailContent, Part, RenderError, ShortContent, Templates,
        check::{self, Sample},
    },
};
use serde_json::{Value, json};

const LOCALES: [Locale; 2] = [Locale::Ko, Locale::En];

fn manifest(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Templates, schemas and routes as shipped in the repository.
struct Contract {
    templates: Templates,
    schemas: EventSchemas,
    routing: RoutingTable,
}

/// One kind of notification: its template folder and the schema of its `data`.
struct Kind {
    folder: String,
    schema: String,
}

impl Contract {
    fn load() -> Self {
        let routing = RoutingTable::load(&manifest("config/routing.toml")).unwrap();
        let schemas = EventSchemas::load(&manifest("schemas"), routing.event_types()).unwrap();
        let templates = Templates::load(&manifest("templates")).unwrap();
        Contract {
            templates,
            schemas,
            routing,
        }
    }

    /// Every routed event type, then the ad-hoc form.
    fn kinds(&self) -> Vec<Kind> {
        self.routing
            .event_types()
            .into_iter()
            .map(|t| Kind {
                folder: t.to_string(),
                schema: t.to_string(),
            })
            .chain([Kind {
                folder: ADHOC.to_owned(),
                schema: ADHOC_SCHEMA.to_owned(),
            }])
            .collect()
    }

    fn schema(&self, kind: &Kind) -> &EventSchema {
        self.schemas
            .get(&kind.schema)
            .unwrap_or_else(|| panic!("no schema {}", kind.schema))
    }
}

/// The render context the dispatcher builds, as template checks and previews build it
/// (`templates::check::context`), with a two-line ad-hoc body.
fn context(kind: &Kind, locale: Locale, data: &Value) -> tera::Context {
    let sample = Sample {
        subject: "Scheduled maintenance tonight".to_owned(),
        body: "Herald will be unavailable from 2 to 3 am.\nThank you for your patience.".to_owned(),
        user_id: 1001,
        recipient: json!({ "email": "user1001@example.com", "locale": locale.as_str() }),
    };
    check::context(locale, &kind.folder, data, &sample)
}

/// What one notification renders to on the three kinds of channel.
struct Rendered {
    email: EmailContent,
    short: ShortContent,
    slack: Value,
}

fn render_all(
    contract: &Contract,
    kind: &Kind,
    locale: Locale,
    data: &Value,
) -> Result<Rendered, RenderError> {
    let context = context(kind, locale, data);
    let templates = &contract.templates;
    Ok(Rendered {
        email: templates.email(locale, &kind.folder, &context)?,
        short: templates.short(locale, &kind.folder, &context)?,
        slack: templates.slack(locale, &kind.folder, &context)?,
    })
}

/// Every example position, minimal and full, and the hostile free-text payload.
fn payloads(schema: &EventSchema) -> Vec<(String, Value)> {
    schema.test_payloads()
}

#[test]
fn every_event_type_and_the_adhoc_form_render_on_every_channel_in_both_languages_with_minimal_and_full_data()
 {
    let contract = Contract::load();
    let mut failures = BTreeSet::new();
    let mut renders = 0;

    for kind in contract.kinds() {
        for (payload, data) in payloads(contract.schema(&kind)) {
            for locale in LOCALES {
                let context = context(&kind, locale, &data);
                for channel in Channel::ALL {
                    let templates = &contract.templates;
                    let whole = match channel {
                        Channel::Email => {
                            templates
                                .email(locale, &kind.folder, &context)
                                .map(|email| {
                                    if email.html.contains("<b>bold</b>") {
                                        failures.insert(format!(
                                            "{} {payload} data: {locale} email HTML carries \
                                         unescaped markup from the data",
                                            kind.folder
                                        ));
                                    }
                                })
                        }
                        Channel::Slack => {
                            templates
                                .slack(locale, &kind.folder, &context)
                                .map(|message| {
                                    // Data must not ping the channel or inject links.
                                    let text = message.to_string();
                                    if text.contains("<!channel>") || text.contains("<b>") {
                                        failures.insert(format!(
                                            "{} {payload} data: {locale} Slack message carries \
                                         unescaped markup from the data",
                                            kind.folder
                                        ));
                                    }
                                })
                        }
                        _ => templates.short(locale, &kind.folder, &context).map(|_| ()),
                    };
                    renders += 1;
                    let Err(error) = whole else { continue };
                    failures.insert(format!("{} {payload} data: {error}", kind.folder));
                    // The channel stops at its first broken part: name every other one too.
                    for &part in Part::for_channel(channel) {
                        if let Err(error) = templates.render(locale, &kind.folder, part, &context) {
                            failures.insert(format!("{} {payload} data: {error}", kind.folder));
                        }
                    }
                }
            }
        }
    }

    assert!(renders > 0);
    assert!(
        failures.is_empty(),
        "{} template(s) do not render with data their schema allows:\n{}",
        failures.len(),
        failures.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn templates_read_only_fields_their_schema_declares() {
    let contract = Contract::load();
    let mut offences = Vec::new();
    let mut checked = 0;

    for kind in contract.kinds() {
        let schema = contract.schema(&kind);
        for locale in LOCALES {
            let folder = manifest("templates")
                .join(locale.as_str())
                .join(&kind.folder);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
                .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
                .map(|entry| entry.unwrap().path())
                .collect();
            files.sort();
            for file in files {
                let source = std::fs::read_to_string(&file).unwrap();
                checked += 1;
                let undeclared = schema.undeclared_in(&source);
                if !undeclared.is_empty() {
                    offences.push(format!(
                        "templates/{locale}/{}/{} reads {} (not in schemas/{}.json)",
                        kind.folder,
                        file.file_name().unwrap().to_string_lossy(),
                        undeclared.join(", "),
                        kind.schema
                    ));
                }
            }
        }
    }

    assert!(checked > 0);
    assert!(offences.is_empty(), "{}", offences.join("\n"));
}

#[test]
fn every_routed_event_type_has_a_schema_whose_example_passes() {
    let contract = Contract::load();

    for kind in contract.kinds() {
        let schema = contract.schema(&kind);
        assert!(
            schema.check(schema.example()).is_ok(),
            "{}: example",
            kind.schema
        );
        assert!(
            !schema.description().is_empty(),
            "{}: description",
            kind.schema
        );
        assert_eq!(
            schema.document()["$id"],
            format!("https://herald.local/schemas/{}.json", kind.schema)
        );
    }
}

/// Words and marks that give away a missing value in rendered text.
fn artefacts(text: &str, one_line: bool) -> Vec<&'static str> {
    let mut found = Vec::new();
    let words: BTreeSet<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    for word in ["None", "null", "undefined", "NaN"] {
        if words.contains(word) {
            found.push(word);
        }
    }
    for mark in ["()", "( )", " .", " ,", "[]"] {
        if text.contains(mark) {
            found.push(mark);
        }
    }
    if one_line && text.contains("  ") {
        found.push("a doubled space");
    }
    if text.trim() != text && one_line {
        found.push("leading or trailing space");
    }
    found
}

#[test]
fn messages_with_only_the_required_fields_have_no_leftover_artefacts() {
    let contract = Contract::load();
    let mut failures = Vec::new();

    for kind in contract.kinds() {
        for (payload, data) in payloads(contract.schema(&kind)) {
            for locale in LOCALES {
                let Ok(rendered) = render_all(&contract, &kind, locale, &data) else {
                    // Reported by the rendering test above.
                    continue;
                };
                let lines = [
                    ("email subject", rendered.email.subject.as_str(), true),
                    ("in-app title", rendered.short.title.as_str(), true),
                    ("in-app body", rendered.short.body.as_str(), true),
                    (
                        "Slack text",
                        rendered.slack["text"].as_str().unwrap_or_default(),
                        true,
                    ),
                    ("email text", rendered.email.text.as_str(), false),
                ];
                for (part, text, one_line) in lines {
                    let found = artefacts(text, one_line);
                    if !found.is_empty() {
                        failures.push(format!(
                            "{}/{locale} {part} ({payload} data) has {found:?}: {text:?}",
                            kind.folder
                        ));
                    }
                }
                if rendered.email.subject.is_empty() || rendered.short.title.is_empty() {
                    failures.push(format!(
                        "{}/{locale} ({payload} data): an empty subject or title",
                        kind.folder
                    ));
                }
            }
        }
    }

    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_subscription_events_from_the_issue_render_with_plan_amount_and_currency_only() {
    let contract = Contract::load();
    let data = json!({ "plan": "Premium", "amount": 9900, "currency": "KRW" });

    for event_type in [
        "SUBSCRIPTION_EXPIRING",
        "SUBSCRIPTION_CREATED",
        "SUBSCRIPTION_RENEWED",
        "SUBSCRIPTION_CANCELLED",
    ] {
        let kind = Kind {
            folder: event_type.to_owned(),
            schema: event_type.to_owned(),
        };
        let schema = contract.schema(&kind);
        assert!(
            schema.check(&data).is_ok(),
            "{event_type}: the schema refuses it"
        );
        let reads_amount = schema.fields().any(|f| f == "amount");
        let channels = contract
            .routing
            .channels_in_any_domain(&EventType::parse(event_type).unwrap())
            .unwrap();
        for locale in LOCALES {
            let at = format!("{event_type}/{locale}");
            let context = context(&kind, locale, &data);
            let email = contract
                .templates
                .email(locale, event_type, &context)
                .unwrap_or_else(|e| panic!("{at}: {e}"));
            assert!(email.subject.contains("Premium"), "{at}: {}", email.subject);
            assert!(email.text.contains("Premium"), "{at}: {}", email.text);
            if reads_amount {
                let price = match locale {
                    Locale::Ko => "9,900원",
                    Locale::En => "9,900 KRW",
                };
                assert!(email.text.contains(price), "{at}: {}", email.text);
                assert!(email.html.contains(price), "{at}: the HTML lacks {price}");
            }
            if channels.contains(&Channel::InApp) {
                let short = contract
                    .templates
                    .short(locale, event_type, &context)
                    .unwrap_or_else(|e| panic!("{at}: {e}"));
                assert!(!short.title.is_empty(), "{at}");
                assert!(short.body.contains("Premium"), "{at}: {}", short.body);
            }
        }
    }
}
