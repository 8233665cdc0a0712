//! What a template version must pass before it is stored or put back in effect, and the
//! render context of previews: the same names the dispatcher gives a template at send time
//! (`dispatch::worker`'s `prepare`), so a template that passes here renders there.
//!
//! A version passes when it reads no `data` field its event type's schema does not declare,
//! and renders against the schema's minimal payload (required fields only) and its full
//! one (every field), each built from the properties' examples. A Slack part must render
//! Block Kit JSON.

use serde_json::Value;
use uuid::Uuid;

use super::{ADHOC, Part, RenderError, Templates, template_name};
use crate::{
    domain::Locale,
    event_schemas::{ADHOC_SCHEMA, EventSchema, EventSchemas, WHOLE_DATA},
};

/// The largest template source the API stores.
pub const MAX_SOURCE_BYTES: usize = 64 * 1024;

/// Why a version was refused; the message names the template and, for a render error, the
/// field (tera's own words).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{template}: {reason}")]
pub struct Refusal {
    pub template: String,
    pub reason: String,
}

impl From<RenderError> for Refusal {
    fn from(error: RenderError) -> Self {
        Refusal {
            template: error.template,
            reason: error.reason,
        }
    }
}

/// The schema that describes the data of a template folder (`_adhoc` ↔ `ADHOC`).
pub fn schema_of<'a>(schemas: &'a EventSchemas, event_type: &str) -> Option<&'a EventSchema> {
    schemas.get(if event_type == ADHOC {
        ADHOC_SCHEMA
    } else {
        event_type
    })
}

/// Checks `source` as the `part` of `event_type` in `locale` (see the module docs).
pub fn check_version(
    templates: &Templates,
    schema: &EventSchema,
    locale: Locale,
    event_type: &str,
    part: Part,
    source: &str,
) -> Result<(), Refusal> {
    let template = template_name(locale, event_type, part);
    structure(source).map_err(|reason| Refusal {
        template: template.clone(),
        reason,
    })?;
    let undeclared = schema.undeclared_in(source);
    if !undeclared.is_empty() {
        let fields: Vec<String> = undeclared
            .iter()
            .map(|f| {
                if f == WHOLE_DATA {
                    "data as a whole (copied, looped over, indexed by a variable or serialised)"
                        .to_owned()
                } else {
                    format!("data.{f}")
                }
            })
            .collect();
        return Err(Refusal {
            template,
            reason: format!(
                "reads {}, which the {} schema does not declare (templates may read only \
                 declared fields; add it to the schema first)",
                fields.join(", "),
                schema.name()
            ),
        });
    }
    for (payload, data) in schema.test_payloads() {
        let context = context(locale, event_type, &data, &Sample::default());
        templates
            .check(locale, event_type, part, source, &[context])
            .map_err(|e| Refusal {
                template: e.template,
                reason: format!(
                    "{} (with the schema's {payload}, built from its examples)",
                    e.reason
                ),
            })?;
    }
    Ok(())
}

/// A stored version may extend a layout of `_layouts/` and import macros of `_macros/`,
/// nothing else: an `include` (of itself, or of a part that includes it back) or a macro
/// defined in place can recurse until the instance's stack overflows, and reaches into
/// other event types' templates, whose fields this schema does not vouch for.
fn structure(source: &str) -> Result<(), String> {
    use tera::ast::Node;
    fn walk(nodes: &[Node]) -> Result<(), String> {
        for node in nodes {
            match node {
                Node::Include(..) => {
                    return Err("include is not allowed in a stored template; import \
                                macros from _macros/ instead"
                        .to_owned());
                }
                Node::MacroDefinition(..) => {
                    return Err("a stored template may not define macros; import them \
                                from _macros/"
                        .to_owned());
                }
                Node::Block(_, block, _) => walk(&block.body)?,
                Node::Forloop(_, forloop, _) => {
                    walk(&forloop.body)?;
                    walk(forloop.empty_body.as_deref().unwrap_or_default())?;
                }
                Node::If(branches, _) => {
                    for (_, _, body) in &branches.conditions {
                        walk(body)?;
                    }
                    if let Some((_, body)) = &branches.otherwise {
                        walk(body)?;
                    }
                }
                Node::FilterSection(_, section, _) => walk(&section.body)?,
                _ => {}
            }
        }
        Ok(())
    }
    let parsed = tera::Template::new("candidate", None, source).map_err(|e| e.to_string())?;
    if let Some(parent) = parsed
        .parent
        .as_deref()
        .filter(|p| !p.starts_with("_layouts/"))
    {
        return Err(format!(
            "a stored template may extend only a layout of _layouts/, not {parent}"
        ));
    }
    if let Some((file, _)) = parsed
        .imported_macro_files
        .iter()
        .find(|(file, _)| !file.starts_with("_macros/"))
    {
        return Err(format!(
            "a stored template may import macros only from _macros/, not {file}"
        ));
    }
    walk(&parsed.ast)
}

/// What a preview or a check renders besides `data`: the envelope fields a template may
/// read. Subject and body matter to ad-hoc templates only.
#[derive(Debug, Clone)]
pub struct Sample {
    pub subject: String,
    pub body: String,
    pub user_id: i64,
    pub recipient: Value,
}

impl Default for Sample {
    fn default() -> Self {
        Sample {
            subject: "Scheduled maintenance".to_owned(),
            body: "Herald will be down from 02:00 to 03:00.".to_owned(),
            user_id: 42,
            recipient: serde_json::json!({ "email": "user42@example.com", "locale": "en" }),
        }
    }
}

/// The render context of a notification with `data` (the names `prepare` gives, with
/// sample ids).
pub fn context(locale: Locale, event_type: &str, data: &Value, sample: &Sample) -> tera::Context {
    let nil = Uuid::nil().to_string();
    let mut context = tera::Context::new();
    context.insert("data", data);
    context.insert("locale", locale.as_str());
    context.insert("event_type", event_type);
    context.insert("event_id", &nil);
    context.insert("notification_id", &nil);
    context.insert("delivery_id", &nil);
    context.insert("user_id", &Some(sample.user_id));
    context.insert("occurred_at", &chrono::Utc::now().to_rfc3339());
    context.insert("recipient", &sample.recipient);
    let adhoc = event_type == ADHOC;
    context.insert("subject", if adhoc { sample.subject.as_str() } else { "" });
    context.insert("body", if adhoc { sample.body.as_str() } else { "" });
    context
}
