//! The data contract of each event type: a JSON Schema (draft 2020-12) per type in
//! `schemas/{EVENT_TYPE}.json`, checked at the edge (ingest, HTTP intake, broadcasts) so
//! that an event its templates cannot render is refused with the exact path at once,
//! instead of failing at send time and reaching the dead-letter queue one field at a time.
//!
//! `schemas/ADHOC.json` describes the `data` of notifications that bring their own subject
//! and body. Fields a schema does not declare are kept and passed to the templates
//! (`additionalProperties` is left open), so an upstream team can add a field before the
//! templates use it; templates themselves may only read declared fields (checked by a test
//! and when a template is stored through the API).
//!
//! Every property carries `examples`: the first one is what [`EventSchema::minimal_payload`]
//! and [`EventSchema::full_payload`] use, so template checks need no hand-written data.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use jsonschema::{Validator, error::ValidationErrorKind};
use serde_json::{Map, Value};

use crate::domain::EventType;

/// The schema file name of notifications with their own subject and body.
pub const ADHOC_SCHEMA: &str = "ADHOC";

/// Free text that breaks naive templates: quotes and a backslash (JSON), a line break
/// (headers, Slack fields), a Slack mention and HTML markup, and tera's own braces.
pub const HOSTILE_TEXT: &str = "Quote \" back\\slash\nnew line <!channel> <b>bold</b> & {{ x }}";

/// How many problems one refusal lists; the first is the one that matters most often.
const MAX_REPORTED: usize = 5;

/// One thing wrong with an event's `data`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(as = SchemaProblem)]
pub struct Problem {
    /// Where, as a path from the envelope: `data.amount`, `data.items[0].sku`.
    pub path: String,
    /// What was expected there.
    pub message: String,
}

/// Why an event's `data` breaks its schema: every problem found (up to a bound), each with
/// its path. Never echoes the value itself, which may be personal data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SchemaViolation {
    pub event_type: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for SchemaViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "data does not match the {} schema: ", self.event_type)?;
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", problem.path, problem.message)?;
        }
        Ok(())
    }
}

/// One event type's schema, compiled.
pub struct EventSchema {
    name: String,
    document: Value,
    validator: Validator,
    file: PathBuf,
}

impl fmt::Debug for EventSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSchema")
            .field("name", &self.name)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl EventSchema {
    /// Compiles one schema document and checks Herald's own rules on it: an object schema
    /// whose properties each have an example, `required` naming declared properties, and
    /// top-level `examples` that pass the schema.
    pub fn parse(name: &str, document: Value, file: &Path) -> anyhow::Result<Self> {
        let at = file.display();
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&document)
            .map_err(|e| anyhow::anyhow!("{at}: not a valid JSON Schema: {e}"))?;
        if document["type"] != "object" {
            bail!("{at}: the schema of `data` must have \"type\": \"object\"");
        }
        let properties = document["properties"]
            .as_object()
            .with_context(|| format!("{at}: \"properties\" must be an object"))?;
        for (field, property) in properties {
            let has_example = property["examples"]
                .as_array()
                .is_some_and(|e| !e.is_empty());
            if !has_example {
                bail!("{at}: property {field} needs a non-empty \"examples\" array");
            }
        }
        for field in required_of(&document) {
            if !properties.contains_key(field) {
                bail!("{at}: required field {field} is not among the properties");
            }
        }
        let schema = EventSchema {
            name: name.to_owned(),
            document,
            validator,
            file: file.to_owned(),
        };
        let examples = schema.document["examples"]
            .as_array()
            .filter(|e| !e.is_empty())
            .with_context(|| format!("{at}: needs a non-empty top-level \"examples\" array"))?;
        for (i, example) in examples.iter().enumerate() {
            schema
                .check(example)
                .map_err(|e| anyhow::anyhow!("{at}: examples[{i}] fails its own schema: {e}"))?;
        }
        for (what, payload) in schema.test_payloads() {
            schema.check(&payload).map_err(|e| {
                anyhow::anyhow!("{at}: the {what}, built from the properties' examples, fails: {e}")
            })?;
        }
        Ok(schema)
    }

    /// The event type (or [`ADHOC_SCHEMA`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The schema document as published.
    pub fn document(&self) -> &Value {
        &self.document
    }

    /// One-line description of the event type (the schema's `description`).
    pub fn description(&self) -> &str {
        self.document["description"].as_str().unwrap_or_default()
    }

    /// The first top-level example: a realistic `data` object.
    pub fn example(&self) -> &Value {
        &self.document["examples"][0]
    }

    /// The declared fields, in file order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.properties().keys().map(String::as_str)
    }

    /// The fields an event must carry.
    pub fn required(&self) -> Vec<&str> {
        required_of(&self.document).collect()
    }

    /// The `data` fields a template's source reads that this schema does not declare.
    /// Templates may read only declared fields, so that what the schema promises is all
    /// they need; a conditional use (`{% if data.x %}`) counts too.
    pub fn undeclared_in(&self, source: &str) -> Vec<String> {
        let declared = self.properties();
        fields_read(source)
            .into_iter()
            .filter(|field| !declared.contains_key(field))
            .collect()
    }

    /// Checks `data`; every problem found comes back with its path.
    pub fn check(&self, data: &Value) -> Result<(), SchemaViolation> {
        let problems: Vec<Problem> = self
            .validator
            .iter_errors(data)
            .take(MAX_REPORTED)
            .map(|error| problem(&error, self.properties()))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SchemaViolation {
                event_type: self.name.clone(),
                problems,
            })
        }
    }

    /// Every payload a template must render: for each example position, the required
    /// fields alone and every field (a property with fewer examples repeats its first),
    /// then every field with [`HOSTILE_TEXT`] in each free-text string. Each is labelled.
    pub fn test_payloads(&self) -> Vec<(String, Value)> {
        let depth = self
            .properties()
            .values()
            .filter_map(|p| p["examples"].as_array().map(Vec::len))
            .max()
            .unwrap_or(1);
        let required = self.required();
        let mut payloads = Vec::new();
        for i in 0..depth {
            payloads.push((
                format!("minimal payload (examples[{i}])"),
                self.payload_at(i, |field| required.contains(&field)),
            ));
            payloads.push((
                format!("full payload (examples[{i}])"),
                self.payload_at(i, |_| true),
            ));
        }
        let hostile = self.hostile_payload();
        if self.check(&hostile).is_ok() {
            payloads.push((
                "full payload with quotes, line breaks and markup in its free text".to_owned(),
                hostile,
            ));
        }
        payloads
    }

    /// The full payload with [`HOSTILE_TEXT`] (cut to `maxLength`) in every string field
    /// without a pattern, format or list of values.
    fn hostile_payload(&self) -> Value {
        let mut payload = self.full_payload();
        for (field, property) in self.properties() {
            let text = property["type"] == "string"
                || property["type"]
                    .as_array()
                    .is_some_and(|t| t.contains(&Value::from("string")));
            let constrained = ["pattern", "format", "enum", "const", "anyOf", "oneOf"]
                .iter()
                .any(|k| property.get(*k).is_some());
            if text && !constrained {
                let max = property["maxLength"].as_u64().unwrap_or(u64::MAX) as usize;
                payload[field] = HOSTILE_TEXT.chars().take(max).collect::<String>().into();
            }
        }
        payload
    }

    /// `data` with only the required fields, each at its first example.
    pub fn minimal_payload(&self) -> Value {
        let required: Vec<&str> = self.required();
        self.payload(|field| required.contains(&field))
    }

    /// `data` with every declared field, each at its first example.
    pub fn full_payload(&self) -> Value {
        self.payload(|_| true)
    }

    fn payload(&self, include: impl Fn(&str) -> bool) -> Value {
        self.payload_at(0, include)
    }

    fn payload_at(&self, index: usize, include: impl Fn(&str) -> bool) -> Value {
        Value::Object(
            self.properties()
                .iter()
                .filter(|(field, _)| include(field))
                .map(|(field, property)| {
                    let examples = &property["examples"];
                    let example = examples.get(index).unwrap_or(&examples[0]);
                    (field.clone(), example.clone())
                })
                .collect(),
        )
    }

    fn properties(&self) -> &Map<String, Value> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        self.document["properties"]
            .as_object()
            .unwrap_or_else(|| EMPTY.get_or_init(Map::new))
    }
}

/// What a template reads of `data` as a whole (copied to a variable, looped over, indexed
/// with a variable, serialised): fields cannot be checked then, so it is refused.
pub const WHOLE_DATA: &str = "data (as a whole)";

/// The top-level `data` fields a tera source reads inside its tags (`{{ }}` and `{% %}`;
/// text and `{# #}` comments are not code): `data.name` and `data["name"]`. Any other use
/// of `data`, or of `__tera_context`, is reported as [`WHOLE_DATA`].
pub fn fields_read(source: &str) -> std::collections::BTreeSet<String> {
    let mut fields = std::collections::BTreeSet::new();
    let mut rest = source;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = match after.chars().next() {
            Some('{') => "}}",
            Some('%') => "%}",
            Some('#') => {
                rest = after.find("#}").map_or("", |end| &after[end + 2..]);
                continue;
            }
            _ => {
                rest = after;
                continue;
            }
        };
        let (code, next) = after[1..].find(close).map_or((&after[1..], ""), |end| {
            (&after[1..1 + end], &after[1 + end + 2..])
        });
        read_in_code(code, &mut fields);
        rest = next;
    }
    fields
}

fn read_in_code(code: &str, fields: &mut std::collections::BTreeSet<String>) {
    let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = code.as_bytes();
    let mut in_string: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(quote) = in_string {
            if b == quote {
                in_string = None;
            }
            i += 1;
            continue;
        }
        if matches!(b, b'"' | b'\'' | b'`') {
            in_string = Some(b);
            i += 1;
            continue;
        }
        if !is_name(b) || (i > 0 && (is_name(bytes[i - 1]) || bytes[i - 1] == b'.')) {
            i += 1;
            continue;
        }
        let end = (i..bytes.len())
            .find(|&j| !is_name(bytes[j]))
            .unwrap_or(bytes.len());
        let word = &code[i..end];
        if word == "__tera_context" {
            fields.insert(WHOLE_DATA.to_owned());
        } else if word == "data" {
            let tail = &code[end..];
            let field = if let Some(dotted) = tail.strip_prefix('.') {
                dotted
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .next()
            } else if let Some(indexed) = tail.strip_prefix('[') {
                let indexed = indexed.trim_start();
                match indexed.chars().next() {
                    Some(q @ ('"' | '\'')) => indexed[1..]
                        .split_once(q)
                        .filter(|(_, after)| after.trim_start().starts_with(']'))
                        .map(|(name, _)| name),
                    _ => None,
                }
            } else {
                None
            };
            match field {
                Some(name) if !name.is_empty() => fields.insert(name.to_owned()),
                _ => fields.insert(WHOLE_DATA.to_owned()),
            };
        }
        i = end;
    }
}

fn required_of(document: &Value) -> impl Iterator<Item = &str> {
    document["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// Turns a validator error into a path from the envelope and a message without the value.
fn problem(error: &jsonschema::ValidationError<'_>, properties: &Map<String, Value>) -> Problem {
    let mut path = String::from("data");
    for segment in error.instance_path().as_str().split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            path.push_str(&format!("[{segment}]"));
        } else {
            path.push('.');
            path.push_str(&segment);
        }
    }
    let top = error
        .instance_path()
        .as_str()
        .split('/')
        .nth(1)
        .map(str::to_owned);
    match error.kind() {
        ValidationErrorKind::Required { property } => {
            let field = property.as_str().unwrap_or_default();
            Problem {
                path: format!("{path}.{field}"),
                message: format!("is required{}", hint(properties.get(field))),
            }
        }
        _ => Problem {
            path,
            message: format!(
                "{}{}",
                error.masked_with("the value"),
                hint(top.and_then(|t| properties.get(&t)))
            ),
        },
    }
}

/// What a declared field should hold, from its schema: its description and first example.
fn hint(property: Option<&Value>) -> String {
    let Some(property) = property else {
        return String::new();
    };
    let description = property["description"].as_str().unwrap_or_default();
    let description = description.strip_suffix('.').unwrap_or(description);
    match (description.is_empty(), property["examples"].get(0)) {
        (false, Some(example)) => format!(" (expected: {description}; e.g. {example})"),
        (true, Some(example)) => format!(" (e.g. {example})"),
        (false, None) => format!(" (expected: {description})"),
        (true, None) => String::new(),
    }
}

/// Every event type's schema, loaded once at startup.
#[derive(Debug)]
pub struct EventSchemas {
    dir: PathBuf,
    by_name: BTreeMap<String, EventSchema>,
}

impl EventSchemas {
    /// Loads `dir/*.json`. Each file is named after its event type (or `ADHOC`), and each
    /// of `required` must have one: a routed event type without a schema stops startup.
    pub fn load<'a>(
        dir: &Path,
        required: impl IntoIterator<Item = &'a EventType>,
    ) -> anyhow::Result<Self> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("Failed to read the event schemas in {}", dir.display()))?;
        let mut by_name = BTreeMap::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            if name != ADHOC_SCHEMA {
                EventType::parse(&name).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: the file name is not an event type: {e}",
                        path.display()
                    )
                })?;
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("Failed to read {}", path.display()))?;
            let document: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            by_name.insert(name.clone(), EventSchema::parse(&name, document, &path)?);
        }
        let missing: Vec<String> = required
            .into_iter()
            .map(EventType::to_string)
            .chain([ADHOC_SCHEMA.to_owned()])
            .filter(|name| !by_name.contains_key(name))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{}: no schema for {} (each routed event type needs {{EVENT_TYPE}}.json)",
                dir.display(),
                missing.join(", ")
            );
        }
        Ok(EventSchemas {
            dir: dir.to_owned(),
            by_name,
        })
    }

    /// The folder the schemas came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The schema of an event type, or of ad-hoc notifications ([`ADHOC_SCHEMA`]).
    pub fn get(&self, name: &str) -> Option<&EventSchema> {
        self.by_name.get(name)
    }

    /// Every schema, by name.
    pub fn iter(&self) -> impl Iterator<Item = &EventSchema> {
        self.by_name.values()
    }

    /// Checks an event's `data` against its type's schema. A type without a schema is not
    /// routed, which the caller reports on its own terms.
    pub fn check(&self, name: &str, data: &Map<String, Value>) -> Result<(), SchemaViolation> {
        match self.by_name.get(name) {
            // Validating a borrowed map needs a Value; the clone is of one event's data,
            // bounded by the intake's size limit.
            Some(schema) => schema.check(&Value::Object(data.clone())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema(document: Value) -> anyhow::Result<EventSchema> {
        EventSchema::parse("TEST_EVENT", document, Path::new("TEST_EVENT.json"))
    }

    fn order_schema() -> EventSchema {
        schema(json!({
            "type": "object",
            "description": "An order",
            "required": ["orderId", "amount"],
            "properties": {
                "orderId": { "type": "string", "minLength": 1, "examples": ["o-1"] },
                "amount": { "type": "number", "minimum": 0, "examples": [12000] },
                "shippedAt": { "type": "string", "format": "date-time", "examples": ["2026-11-21T09:30:00Z"] },
                "items": {
                    "type": "array",
                    "items": { "type": "object", "required": ["sku"], "properties": { "sku": { "type": "string" } } },
                    "examples": [[{ "sku": "A-1" }]]
                }
            },
            "examples": [{ "orderId": "o-1", "amount": 5 }]
        }))
        .unwrap()
    }

    #[test]
    fn a_missing_required_field_is_named_by_its_path() {
        let error = order_schema()
            .check(&json!({ "orderId": "o-1" }))
            .unwrap_err();

        assert_eq!(error.problems[0].path, "data.amount");
        assert_eq!(error.problems[0].message, "is required (e.g. 12000)");
        assert!(
            error.to_string().contains("data.amount: is required"),
            "{error}"
        );
    }

    #[test]
    fn a_wrong_type_deep_in_the_data_is_named_without_echoing_the_value() {
        let error = order_schema()
            .check(&json!({
                "orderId": "o-1", "amount": "secret-ish",
                "items": [{ "sku": "A" }, { "sku": 7 }]
            }))
            .unwrap_err();

        let paths: Vec<&str> = error.problems.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"data.amount"), "{paths:?}");
        assert!(paths.contains(&"data.items[1].sku"), "{paths:?}");
        assert!(!error.to_string().contains("secret-ish"), "{error}");
    }

    #[test]
    fn formats_are_checked() {
        let error = order_schema()
            .check(&json!({ "orderId": "o-1", "amount": 1, "shippedAt": "yesterday" }))
            .unwrap_err();

        assert_eq!(error.problems[0].path, "data.shippedAt");
    }

    #[test]
    fn unknown_extra_fields_are_accepted() {
        assert!(
            order_schema()
                .check(&json!({ "orderId": "o-1", "amount": 1, "giftWrap": true }))
                .is_ok()
        );
    }

    #[test]
    fn fields_read_by_a_template_are_found_in_every_form() {
        let source = r#"Your data.zip at https://x.test/data.json {# data.comment #}
            {{ data.orderId }} {% if data.shippedAt %}{{ data["carrier"] }}{% endif %}
            {{ metadata.x }} {{ data.amount | number }} {{ my_data.y }} {{ data['sku'] }}
            {{ "data.inString" }}"#;

        let fields: Vec<String> = fields_read(source).into_iter().collect();

        assert_eq!(fields, ["amount", "carrier", "orderId", "shippedAt", "sku"]);
        assert_eq!(order_schema().undeclared_in(source), ["carrier", "sku"]);
    }

    #[test]
    fn reading_data_as_a_whole_is_reported() {
        for source in [
            "{% set d = data %}{{ d.tip }}",
            "{{ data[key] }}",
            "{% for k, v in data %}{{ v }}{% endfor %}",
            "{{ data | json_encode() }}",
            "{{ __tera_context }}",
        ] {
            assert!(fields_read(source).contains(WHOLE_DATA), "{source}");
        }
    }

    #[test]
    fn payloads_come_from_the_first_examples() {
        let schema = order_schema();

        assert_eq!(
            schema.minimal_payload(),
            json!({ "orderId": "o-1", "amount": 12000 })
        );
        assert_eq!(schema.full_payload()["items"][0]["sku"], "A-1");
        assert_eq!(schema.full_payload().as_object().unwrap().len(), 4);
    }

    #[test]
    fn a_schema_breaking_herald_rules_is_refused_with_the_reason() {
        let no_example = schema(json!({
            "type": "object",
            "properties": { "a": { "type": "string" } },
            "examples": [{}]
        }));
        let undeclared_required = schema(json!({
            "type": "object",
            "required": ["b"],
            "properties": { "a": { "type": "string", "examples": ["x"] } },
            "examples": [{ "b": 1 }]
        }));
        let bad_example = schema(json!({
            "type": "object",
            "properties": { "a": { "type": "string", "examples": ["x"] } },
            "examples": [{ "a": 1 }]
        }));

        assert!(
            no_example
                .unwrap_err()
                .to_string()
                .contains("property a needs")
        );
        assert!(
            undeclared_required
                .unwrap_err()
                .to_string()
                .contains("required field b")
        );
        assert!(bad_example.unwrap_err().to_string().contains("examples[0]"));
    }
}
