//! Notification templates (tera), rendered at send time so that a template fixed after a
//! failure applies when the delivery is retried. Edits on disk are picked up without a
//! restart: the folder is re-read when a file changes (checked at most once a second).
//!
//! Layout: `templates/{locale}/{EVENT_TYPE}/{part}`, with `_adhoc` as the event type of
//! notifications that bring their own subject and body, and shared `_layouts/`, `_macros/`.
//!
//! The files are the defaults. Versions edited through the API ([`store`], [`check`]) form
//! an [`Overlay`]: each active version replaces the file of the same name, and may extend
//! the file layouts and import the file macros like any file. A locale without a template
//! for a part falls back to the default locale's template for that part.

pub mod check;
pub mod store;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::RwLock,
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use tera::Tera;

use crate::domain::{Channel, Locale};

/// Appended to an event type's folder name for the templates of its digests
/// (`ORDER_SHIPPED.digest`), which receive `events` (each with `data`, `event_id`,
/// `occurred_at`) and `count`.
pub const DIGEST_SUFFIX: &str = ".digest";

/// The event type folder of notifications that carry their own subject and body.
pub const ADHOC: &str = "_adhoc";

/// How often, at most, the folder is checked for edits.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// One renderable part of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    EmailSubject,
    EmailText,
    EmailHtml,
    Slack,
    InAppTitle,
    InAppBody,
}

impl Part {
    /// Every part, in the order the API lists them.
    pub const ALL: [Part; 6] = [
        Part::EmailSubject,
        Part::EmailText,
        Part::EmailHtml,
        Part::Slack,
        Part::InAppTitle,
        Part::InAppBody,
    ];

    /// The part's name in the API and the database: its file name without the extension.
    pub fn name(self) -> &'static str {
        let file = self.file();
        file.split_once('.').map_or(file, |(stem, _)| stem)
    }

    /// The part named `name` (`email_subject`, `slack`, ...).
    pub fn from_name(name: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The file name under `{locale}/{EVENT_TYPE}/`.
    pub fn file(self) -> &'static str {
        match self {
            Part::EmailSubject => "email_subject.txt",
            Part::EmailText => "email_text.txt",
            Part::EmailHtml => "email_html.html",
            Part::Slack => "slack.json",
            Part::InAppTitle => "in_app_title.txt",
            Part::InAppBody => "in_app_body.txt",
        }
    }

    /// The parts a channel needs. SMS, KakaoTalk and push use the short in-app texts.
    pub fn for_channel(channel: Channel) -> &'static [Part] {
        match channel {
            Channel::Email => &[Part::EmailSubject, Part::EmailText, Part::EmailHtml],
            Channel::Slack => &[Part::Slack],
            Channel::InApp | Channel::Sms | Channel::Kakaotalk | Channel::Push => {
                &[Part::InAppTitle, Part::InAppBody]
            }
        }
    }
}

/// Why a template could not be rendered. Always the template's or the data's fault, so a
/// delivery that hits it fails permanently.
#[derive(Debug, Clone, thiserror::Error)]
#[error("template {template}: {reason}")]
pub struct RenderError {
    pub template: String,
    pub reason: String,
}

/// The rendered content of an email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailContent {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// A short title and text (in-app, SMS, KakaoTalk, push).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortContent {
    pub title: String,
    pub body: String,
}

struct Loaded {
    /// The files, as last parsed.
    files: Tera,
    /// The versions stored through the API that are in effect.
    overlay: Overlay,
    /// `files` with `overlay` in place: what renders.
    tera: Tera,
    /// The names of `tera`'s templates: a render looks its template up here, where tera's
    /// own list is only an iterator (a scan of every name, for each part rendered).
    names: HashSet<String>,
    stamp: Stamp,
    checked_at: Instant,
}

/// Template versions activated through the API, which replace the files of the same name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay {
    /// The change counter (`template_revision`) these versions were read at.
    pub revision: i64,
    /// Source by template name (`{locale}/{EVENT_TYPE}/{file}`).
    pub sources: BTreeMap<String, String>,
}

/// The newest modification time and the number of files: changes when a file is edited,
/// added or removed.
type Stamp = (Option<SystemTime>, usize);

/// The name of a template in the set: `{locale}/{EVENT_TYPE}/{file}`.
pub fn template_name(locale: Locale, event_type: &str, part: Part) -> String {
    format!("{locale}/{event_type}/{}", part.file())
}

/// The template set, reloaded when the folder changes, with the API's versions overlaid.
pub struct Templates {
    dir: PathBuf,
    /// Where a locale without a template for a part borrows it from.
    default_locale: Locale,
    loaded: RwLock<Loaded>,
}

impl Templates {
    /// Loads every template under `dir`. A syntax error anywhere fails here, at startup.
    /// The default locale is English until [`Templates::with_default_locale`] says otherwise.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let files = parse_dir(dir).map_err(|reason| anyhow::anyhow!(reason))?;
        Ok(Templates {
            dir: dir.to_owned(),
            default_locale: Locale::En,
            loaded: RwLock::new(Loaded {
                names: names_of(&files),
                tera: files.clone(),
                files,
                overlay: Overlay::default(),
                stamp: stamp(dir),
                checked_at: Instant::now(),
            }),
        })
    }

    /// The locale whose template stands in for a part another locale lacks
    /// (`default_locale` in the routing file).
    pub fn with_default_locale(mut self, locale: Locale) -> Self {
        self.default_locale = locale;
        self
    }

    /// The folder the file templates come from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The source of a part's file, if there is one: version 0 of a template.
    pub fn file_source(&self, locale: Locale, event_type: &str, part: Part) -> Option<String> {
        std::fs::read_to_string(self.dir.join(template_name(locale, event_type, part))).ok()
    }

    /// The revision of the overlay in effect (0 before any version was activated).
    pub fn overlay_revision(&self) -> i64 {
        self.read().overlay.revision
    }

    /// Puts the versions of `overlay` in place of the files of the same name, unless the
    /// overlay in effect is as new. A version that does not parse (it was checked when
    /// stored, so this should not happen) is skipped with an error log, and its file stays
    /// in effect, rather than breaking every template.
    pub fn set_overlay(&self, overlay: Overlay) {
        let mut loaded = self.write();
        if overlay.revision <= loaded.overlay.revision {
            return;
        }
        let tera = overlaid(&loaded.files, &overlay);
        loaded.set_tera(tera);
        tracing::info!(
            revision = overlay.revision,
            versions = overlay.sources.len(),
            "template versions applied"
        );
        loaded.overlay = overlay;
    }

    /// Checks `source` as the template of `part` without changing anything: it must parse
    /// in the set in effect (its layouts and macros included) and render with each context
    /// (a Slack part as Block Kit JSON).
    pub fn check(
        &self,
        locale: Locale,
        event_type: &str,
        part: Part,
        source: &str,
        contexts: &[tera::Context],
    ) -> Result<(), RenderError> {
        self.reload_if_changed();
        let name = template_name(locale, event_type, part);
        let mut candidate = self.read().tera.clone();
        candidate
            .add_raw_template(&name, source)
            .map_err(|e| RenderError {
                template: name.clone(),
                reason: error_chain(&e),
            })?;
        for context in contexts {
            let text = render_part(&candidate, &name, part, context)?;
            if part == Part::Slack {
                check_slack_message(&name, &text)?;
            }
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.loaded.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Loaded> {
        self.loaded.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The template that renders `part` for `locale`: its own, else the default locale's.
    fn resolve(
        &self,
        loaded: &Loaded,
        locale: Locale,
        event_type: &str,
        part: Part,
    ) -> Option<String> {
        [locale, self.default_locale]
            .into_iter()
            .map(|l| template_name(l, event_type, part))
            .find(|name| loaded.names.contains(name))
    }

    /// Renders one part, and says which template did (the locale's or the default one).
    fn render_named(
        &self,
        locale: Locale,
        event_type: &str,
        part: Part,
        context: &tera::Context,
    ) -> Result<(String, String), RenderError> {
        self.reload_if_changed();
        let loaded = self.read();
        let Some(name) = self.resolve(&loaded, locale, event_type, part) else {
            return Err(RenderError {
                template: template_name(locale, event_type, part),
                reason: "no such template".to_owned(),
            });
        };
        let rendered = render_part(&loaded.tera, &name, part, context)?;
        Ok((name, rendered))
    }

    /// Renders one part. `event_type` is the folder name (an event type or [`ADHOC`]). A
    /// locale without this part renders the default locale's.
    pub fn render(
        &self,
        locale: Locale,
        event_type: &str,
        part: Part,
        context: &tera::Context,
    ) -> Result<String, RenderError> {
        self.render_named(locale, event_type, part, context)
            .map(|(_, rendered)| rendered)
    }

    /// Subject, text and HTML of an email.
    pub fn email(
        &self,
        locale: Locale,
        event_type: &str,
        context: &tera::Context,
    ) -> Result<EmailContent, RenderError> {
        Ok(EmailContent {
            subject: self.render(locale, event_type, Part::EmailSubject, context)?,
            text: self.render(locale, event_type, Part::EmailText, context)?,
            html: self.render(locale, event_type, Part::EmailHtml, context)?,
        })
    }

    /// A Slack message, checked to be Block Kit JSON with a fallback `text`.
    pub fn slack(
        &self,
        locale: Locale,
        event_type: &str,
        context: &tera::Context,
    ) -> Result<Value, RenderError> {
        let (name, text) = self.render_slack(locale, event_type, context)?;
        serde_json::from_str(&text).map_err(|e| RenderError {
            template: name,
            reason: format!("did not render valid JSON: {e}"),
        })
    }

    /// [`Templates::slack`] as the JSON text the template rendered, checked the same way:
    /// the body of a webhook request, sent as it is rather than parsed into a tree and
    /// written out again.
    pub fn slack_body(
        &self,
        locale: Locale,
        event_type: &str,
        context: &tera::Context,
    ) -> Result<String, RenderError> {
        self.render_slack(locale, event_type, context)
            .map(|(_, text)| text)
    }

    /// Renders the Slack part and checks it ([`check_slack_message`]); says which
    /// template did, as [`Templates::render_named`] does.
    fn render_slack(
        &self,
        locale: Locale,
        event_type: &str,
        context: &tera::Context,
    ) -> Result<(String, String), RenderError> {
        let (name, text) = self.render_named(locale, event_type, Part::Slack, context)?;
        check_slack_message(&name, &text)?;
        Ok((name, text))
    }

    /// Title and text of an in-app message (also SMS, KakaoTalk and push).
    pub fn short(
        &self,
        locale: Locale,
        event_type: &str,
        context: &tera::Context,
    ) -> Result<ShortContent, RenderError> {
        Ok(ShortContent {
            title: self.render(locale, event_type, Part::InAppTitle, context)?,
            body: self
                .render(locale, event_type, Part::InAppBody, context)?
                .trim()
                .to_owned(),
        })
    }

    /// True when `locale` has its own template for this part (no fallback).
    pub fn has_own(&self, locale: Locale, event_type: &str, part: Part) -> bool {
        self.read()
            .names
            .contains(&template_name(locale, event_type, part))
    }

    /// True when both locales can render every part `channel` needs for `event_type`,
    /// with their own template or the default locale's.
    pub fn covers(&self, event_type: &str, channel: Channel) -> bool {
        let loaded = self.read();
        [Locale::Ko, Locale::En].into_iter().all(|locale| {
            Part::for_channel(channel)
                .iter()
                .all(|part| self.resolve(&loaded, locale, event_type, *part).is_some())
        })
    }

    fn reload_if_changed(&self) {
        {
            let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
            if loaded.checked_at.elapsed() < RELOAD_CHECK {
                return;
            }
        }
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        if loaded.checked_at.elapsed() < RELOAD_CHECK {
            return;
        }
        loaded.checked_at = Instant::now();
        let now = stamp(&self.dir);
        if now == loaded.stamp {
            return;
        }
        match parse_dir(&self.dir) {
            Ok(files) => {
                let tera = overlaid(&files, &loaded.overlay);
                loaded.set_tera(tera);
                loaded.files = files;
                loaded.stamp = now;
                tracing::info!(dir = %self.dir.display(), "templates reloaded");
            }
            Err(reason) => {
                // Keep serving the last good set; the broken file is reported until fixed.
                tracing::error!(%reason, "templates changed but do not parse; keeping the previous set");
            }
        }
    }
}

/// Renders the template `name` as `part`.
fn render_part(
    tera: &Tera,
    name: &str,
    part: Part,
    context: &tera::Context,
) -> Result<String, RenderError> {
    let rendered = tera.render(name, context).map_err(|e| RenderError {
        template: name.to_owned(),
        reason: error_chain(&e),
    })?;
    Ok(match part {
        // Data with line breaks must not make a multi-line subject (header injection).
        Part::EmailSubject | Part::InAppTitle => rendered
            .split(['\r', '\n'])
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        _ => rendered,
    })
}

/// Checks a rendered Slack part to be Block Kit JSON with a fallback `text`, without
/// building it as a tree: only the top level's members are looked at, and their values
/// are skipped over once their kind is known.
fn check_slack_message(name: &str, text: &str) -> Result<(), RenderError> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};

    /// The kind of a JSON value, whose contents are skipped.
    #[derive(PartialEq)]
    enum Kind {
        String,
        Array,
        Object { text: bool, blocks: bool },
        Other,
    }
    /// Reads a value's kind; `top` also reads an object's `text` and `blocks` kinds.
    struct KindOf {
        top: bool,
    }
    impl<'de> serde::de::DeserializeSeed<'de> for KindOf {
        type Value = Kind;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for KindOf {
        type Value = Kind;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_str<E>(self, _: &str) -> Result<Kind, E> {
            Ok(Kind::String)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Kind::Array)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
            let (mut text, mut blocks) = (false, false);
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                // A repeated member counts with its last value, as in a parsed tree.
                match (self.top, key.as_ref()) {
                    (true, "text") => {
                        text = map.next_value_seed(KindOf { top: false })? == Kind::String
                    }
                    (true, "blocks") => {
                        blocks = map.next_value_seed(KindOf { top: false })? == Kind::Array
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Kind::Object { text, blocks })
        }
        fn visit_bool<E>(self, _: bool) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
        fn visit_unit<E>(self) -> Result<Kind, E> {
            Ok(Kind::Other)
        }
    }

    let mut reader = serde_json::Deserializer::from_str(text);
    let kind = reader
        .deserialize_any(KindOf { top: true })
        .and_then(|kind| reader.end().map(|()| kind))
        .map_err(|e| RenderError {
            template: name.to_owned(),
            reason: format!("did not render valid JSON: {e}"),
        })?;
    if kind
        != (Kind::Object {
            text: true,
            blocks: true,
        })
    {
        return Err(RenderError {
            template: name.to_owned(),
            reason: "a Slack message needs a \"text\" string and a \"blocks\" array".to_owned(),
        });
    }
    Ok(())
}

impl Loaded {
    fn set_tera(&mut self, tera: Tera) {
        self.names = names_of(&tera);
        self.tera = tera;
    }
}

fn names_of(tera: &Tera) -> HashSet<String> {
    tera.get_template_names().map(str::to_owned).collect()
}

/// `files` with each version of `overlay` in place of the file of its name.
fn overlaid(files: &Tera, overlay: &Overlay) -> Tera {
    let mut all = files.clone();
    if all.add_raw_templates(overlay.sources.iter()).is_ok() {
        return all;
    }
    // One of them does not parse: add them one by one, so that only that one is skipped.
    let mut tera = files.clone();
    for (name, source) in &overlay.sources {
        let mut candidate = tera.clone();
        match candidate.add_raw_template(name, source) {
            Ok(()) => tera = candidate,
            Err(e) => tracing::error!(
                template = %name,
                reason = %error_chain(&e),
                "a stored template version does not parse; its file stays in effect"
            ),
        }
    }
    tera
}

fn parse_dir(dir: &Path) -> Result<Tera, String> {
    let glob = format!("{}/**/*.{{txt,html,json}}", dir.display());
    let mut tera = Tera::new(&glob).map_err(|e| {
        format!(
            "templates in {} do not parse: {}",
            dir.display(),
            error_chain(&e)
        )
    })?;
    tera.register_filter("number", number_filter);
    tera.register_filter("mrkdwn", mrkdwn_filter);
    tera.register_filter("money", money_filter);
    // tera's built-in `get_env` reads the process environment: a template stored through
    // the API could put HERALD_ADMIN_TOKEN or the database password into a preview or an
    // email. No template needs it, so it fails like an unknown function would.
    tera.register_function("get_env", |_: &HashMap<String, Value>| {
        Err(tera::Error::msg(
            "get_env is not available in Herald templates",
        ))
    });
    tera.register_function("range", bounded_range);
    Ok(tera)
}

/// The most items `range` gives: enough for any message, too few to stall a worker.
const MAX_RANGE_ITEMS: i64 = 1000;

/// tera's `range(end, start=0, step_by=1)`, refusing more than [`MAX_RANGE_ITEMS`] items
/// (tera's own has no bound, so `range(end=1000000000)` in a stored template, or an end
/// taken from the data, would exhaust memory).
fn bounded_range(args: &HashMap<String, Value>) -> tera::Result<Value> {
    let number = |name: &str, default: Option<i64>| match args.get(name) {
        Some(value) => value
            .as_i64()
            .ok_or_else(|| tera::Error::msg(format!("range: {name} must be an integer"))),
        None => default.ok_or_else(|| tera::Error::msg(format!("range: {name} is required"))),
    };
    let (start, end, step) = (
        number("start", Some(0))?,
        number("end", None)?,
        number("step_by", Some(1))?,
    );
    if step <= 0 {
        return Err(tera::Error::msg("range: step_by must be positive"));
    }
    let count = if end > start {
        (end - start + step - 1) / step
    } else {
        0
    };
    if count > MAX_RANGE_ITEMS {
        return Err(tera::Error::msg(format!(
            "range: at most {MAX_RANGE_ITEMS} items, asked for {count}"
        )));
    }
    Ok(Value::from(
        (0..count).map(|i| start + i * step).collect::<Vec<i64>>(),
    ))
}

fn stamp(dir: &Path) -> Stamp {
    fn walk(dir: &Path, newest: &mut Option<SystemTime>, count: &mut usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                walk(&entry.path(), newest, count);
            } else {
                *count += 1;
                if let Ok(modified) = meta.modified() {
                    *newest = (*newest).max(Some(modified));
                }
            }
        }
    }
    let (mut newest, mut count) = (None, 0);
    walk(dir, &mut newest, &mut count);
    (newest, count)
}

fn error_chain(error: &tera::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `{{ 12000 | number }}` gives `12,000`. Accepts what the event schemas allow for an
/// amount: integers, floats (shown with two decimals), and decimal strings such as
/// `"19.99"` or `"1234567.5"`, whose fraction is kept as written.
fn number_filter(value: &Value, _: &HashMap<String, Value>) -> tera::Result<Value> {
    let formatted = match value {
        Value::Number(n) if n.is_i64() || n.is_u64() => group_thousands(&n.to_string()),
        Value::Number(n) => {
            let text = format!("{:.2}", n.as_f64().unwrap_or_default());
            let (whole, fraction) = text.split_once('.').unwrap_or((&text, "00"));
            format!("{}.{fraction}", group_thousands(whole))
        }
        Value::String(s) if is_decimal(s) => match s.split_once('.') {
            Some((whole, fraction)) => format!("{}.{fraction}", group_thousands(whole)),
            None => group_thousands(s),
        },
        // The value itself is not repeated: the error reaches last_error and DLQ headers.
        Value::String(_) => {
            return Err(tera::Error::msg(
                "number: the value is a string that is not a decimal number",
            ));
        }
        other => {
            return Err(tera::Error::msg(format!(
                "number: the value is {}",
                kind_of(other)
            )));
        }
    };
    Ok(Value::String(formatted))
}

/// `{{ data.amount | money(currency=data.currency, locale="ko") }}`: the amount with
/// thousands separators (the `number` filter) and its currency, as a reader of `locale`
/// expects it: `12,000원` for won in Korean, `12,000 KRW` or `19.99 USD` otherwise.
fn money_filter(value: &Value, args: &HashMap<String, Value>) -> tera::Result<Value> {
    let Value::String(amount) = number_filter(value, args)? else {
        unreachable!("number_filter gives a string");
    };
    let currency = match args.get("currency") {
        Some(Value::String(currency)) => currency,
        Some(other) => {
            return Err(tera::Error::msg(format!(
                "money: the currency is {}",
                kind_of(other)
            )));
        }
        None => return Err(tera::Error::msg("money: currency is required")),
    };
    let korean = args.get("locale").and_then(Value::as_str) == Some("ko");
    Ok(Value::String(if korean && currency == "KRW" {
        format!("{amount}원")
    } else {
        format!("{amount} {currency}")
    }))
}

/// `{{ data.reason | mrkdwn }}`: the value as Slack mrkdwn text, with `&`, `<` and `>`
/// escaped so that it cannot add a link or a mention such as `<!channel>`. Strings and
/// numbers; the result still goes through `json_encode()` in a Block Kit template.
fn mrkdwn_filter(value: &Value, _: &HashMap<String, Value>) -> tera::Result<Value> {
    let text = match value {
        Value::String(s) => s.as_str(),
        Value::Number(n) => return Ok(Value::String(n.to_string())),
        Value::Bool(b) => return Ok(Value::String(b.to_string())),
        Value::Null => "",
        other => {
            return Err(tera::Error::msg(format!(
                "mrkdwn: the value is {}",
                kind_of(other)
            )));
        }
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    Ok(Value::String(out))
}

/// What a filter was given that it cannot take, named without repeating the value (the
/// error reaches last_error and DLQ headers).
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
        Value::Number(_) => "a number",
    }
}

/// `-?digits(.digits)?`: no exponent, no `inf`/`NaN`, no separators already in place.
fn is_decimal(text: &str) -> bool {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, "0"));
    [whole, fraction]
        .iter()
        .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

fn group_thousands(digits: &str) -> String {
    let (sign, digits) = digits
        .strip_prefix('-')
        .map_or(("", digits), |rest| ("-", rest));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

#[cfg(test)]
mod overlay_tests;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::routing::RoutingTable;

    fn manifest(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    fn context(data: Value) -> tera::Context {
        let mut context = tera::Context::new();
        context.insert("data", &data);
        context.insert("notification_id", "0190-test");
        context.insert("occurred_at", "2026-11-21T09:30:00Z");
        context.insert("subject", "Maintenance tonight");
        context.insert("body", "We will be down\nfrom 2 to 3 am.");
        context
    }

    #[test]
    fn digest_templates_list_every_event_in_both_languages() {
        let templates = Templates::load(&manifest("templates")).unwrap();
        let mut context = context(json!({ "orderId": "o-1" }));
        let events: Vec<Value> = (1..=3)
            .map(|i| {
                json!({
                    "event_id": format!("e-{i}"),
                    "occurred_at": "2026-11-21T09:30:00Z",
                    "data": { "orderId": format!("o-{i}"), "carrier": "CJ", "trackingNumber": format!("T-{i}") },
                })
            })
            .collect();
        context.insert("count", &3);
        context.insert("events", &events);
        let folder = format!("ORDER_SHIPPED{DIGEST_SUFFIX}");
        for locale in [Locale::Ko, Locale::En] {
            let email = templates.email(locale, &folder, &context).unwrap();
            let short = templates.short(locale, &folder, &context).unwrap();
            let slack = templates
                .slack(locale, &folder, &context)
                .unwrap()
                .to_string();
            assert!(email.subject.contains('3'), "{}", email.subject);
            assert!(short.title.contains('3'), "{}", short.title);
            for i in 1..=3 {
                let order = format!("o-{i}");
                for (part, text) in [
                    ("text", &email.text),
                    ("html", &email.html),
                    ("short", &short.body),
                    ("slack", &slack),
                ] {
                    assert!(
                        text.contains(&order),
                        "{locale} {part} lacks {order}: {text}"
                    );
                }
                assert!(email.text.contains(&format!("T-{i}")), "{}", email.text);
            }
        }
    }

    #[test]
    fn a_slack_message_needs_a_text_string_and_a_blocks_array_at_its_top_level() {
        let ok = |text: &str| check_slack_message("t", text).is_ok();
        assert!(ok(
            r#"{"blocks": [{"text": 1}], "text": "x", "other": {"a": [1, null]}}"#
        ));
        assert!(!ok(r#"{"text": 1, "blocks": []}"#));
        assert!(!ok(r#"{"text": "x", "blocks": {}}"#));
        assert!(!ok(r#"{"blocks": [{"text": "only a block's"}]}"#));
        assert!(!ok(r#"[{"text": "x", "blocks": []}]"#));
        assert!(!ok(r#""text""#));
        // A repeated member counts with its last value, as in a parsed tree.
        assert!(!ok(r#"{"text": "x", "blocks": [], "text": null}"#));
        assert!(ok(r#"{"text": null, "blocks": [], "text": "x"}"#));
        let trailing = check_slack_message("t", r#"{"text": "x", "blocks": []} {}"#);
        assert!(trailing.unwrap_err().reason.contains("valid JSON"));
    }

    #[test]
    fn a_slack_body_is_the_message_as_rendered() {
        let templates = Templates::load(&manifest("templates")).unwrap();
        let context = context(json!({ "orderId": "o-1", "amount": 12000, "currency": "KRW" }));
        for locale in [Locale::Ko, Locale::En] {
            let body = templates
                .slack_body(locale, "PAYMENT_COMPLETED", &context)
                .unwrap();
            let tree = templates
                .slack(locale, "PAYMENT_COMPLETED", &context)
                .unwrap();
            assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), tree);
            assert!(body.contains("o-1"), "{body}");
        }
    }

    #[test]
    fn line_breaks_in_data_cannot_make_a_multi_line_subject_and_markup_is_escaped_in_html() {
        let templates = Templates::load(&manifest("templates")).unwrap();
        let context = context(json!({
            "orderId": "o-1\r\nBcc: victim@example.com", "amount": 12000, "currency": "KRW",
            "reason": "card \"declined\"\nretry <later>"
        }));

        for locale in [Locale::Ko, Locale::En] {
            let email = templates.email(locale, "PAYMENT_FAILED", &context).unwrap();
            let short = templates.short(locale, "PAYMENT_FAILED", &context).unwrap();

            assert!(email.subject.contains("Bcc:"), "{}", email.subject);
            assert!(!email.subject.contains(['\r', '\n']), "{:?}", email.subject);
            assert!(!short.title.contains(['\r', '\n']), "{:?}", short.title);
            assert!(
                email.html.contains("&lt;later&gt;"),
                "{locale}: HTML is escaped"
            );
            assert!(!email.html.contains("<later>"), "{locale}: HTML is escaped");
        }
    }

    #[test]
    fn every_event_type_has_every_part_in_both_languages() {
        let templates = Templates::load(&manifest("templates")).unwrap();
        let routing = RoutingTable::load(&manifest("config/routing.toml")).unwrap();

        for event_type in routing
            .event_types()
            .into_iter()
            .map(|t| t.as_str())
            .chain([ADHOC])
        {
            for channel in Channel::ALL {
                assert!(
                    templates.covers(event_type, channel),
                    "{event_type} {channel}"
                );
            }
        }
    }

    #[test]
    fn korean_amounts_in_won_read_naturally() {
        let templates = Templates::load(&manifest("templates")).unwrap();
        let context = context(json!({ "amount": 12000, "currency": "KRW" }));

        let email = templates
            .email(Locale::Ko, "PAYMENT_FAILED", &context)
            .unwrap();

        assert!(email.text.contains("12,000원"), "{}", email.text);
    }

    #[test]
    fn adhoc_notifications_render_their_own_subject_and_body() {
        let templates = Templates::load(&manifest("templates")).unwrap();
        let context = context(json!({}));

        let email = templates.email(Locale::En, ADHOC, &context).unwrap();

        assert_eq!(email.subject, "Maintenance tonight");
        assert!(email.text.contains("We will be down"));
    }

    #[test]
    fn a_missing_required_field_is_a_render_error_naming_the_template() {
        let templates = Templates::load(&manifest("templates")).unwrap();

        let error = templates
            .email(Locale::En, "PAYMENT_FAILED", &context(json!({})))
            .unwrap_err();

        assert!(error.template.starts_with("en/PAYMENT_FAILED/"), "{error}");
    }

    #[test]
    fn an_edited_template_applies_without_a_restart() {
        let dir = std::env::temp_dir().join(format!("herald-templates-{}", uuid::Uuid::new_v4()));
        let folder = dir.join("en/ORDER_SHIPPED");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(
            folder.join("in_app_title.txt"),
            "Shipped {{ data.orderId }}",
        )
        .unwrap();
        std::fs::write(folder.join("in_app_body.txt"), "{{ data.nope }}").unwrap();
        let templates = Templates::load(&dir).unwrap();
        let context = context(json!({ "orderId": "o-9" }));
        assert!(
            templates
                .short(Locale::En, "ORDER_SHIPPED", &context)
                .is_err()
        );

        std::fs::write(folder.join("in_app_body.txt"), "On its way").unwrap();
        std::thread::sleep(RELOAD_CHECK + Duration::from_millis(50));

        let short = templates
            .short(Locale::En, "ORDER_SHIPPED", &context)
            .unwrap();
        assert_eq!(short.title, "Shipped o-9");
        assert_eq!(short.body, "On its way");
    }

    #[test]
    fn templates_cannot_read_the_environment() {
        let dir = std::env::temp_dir().join(format!("herald-templates-{}", uuid::Uuid::new_v4()));
        let folder = dir.join("en/ORDER_SHIPPED");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(
            folder.join("in_app_title.txt"),
            r#"{{ get_env(name="PATH") }}"#,
        )
        .unwrap();
        std::fs::write(folder.join("in_app_body.txt"), "body").unwrap();
        let templates = Templates::load(&dir).unwrap();

        let error = templates
            .render(
                Locale::En,
                "ORDER_SHIPPED",
                Part::InAppTitle,
                &tera::Context::new(),
            )
            .unwrap_err();

        assert!(error.reason.contains("get_env is not available"), "{error}");
        assert!(!error.reason.contains("/usr"), "{error}");
    }

    #[test]
    fn range_works_within_its_bound_and_refuses_beyond_it() {
        let args = |pairs: &[(&str, i64)]| -> HashMap<String, Value> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
                .collect()
        };

        assert_eq!(
            bounded_range(&args(&[("end", 3)])).unwrap(),
            serde_json::json!([0, 1, 2])
        );
        assert_eq!(
            bounded_range(&args(&[("start", 1), ("end", 8), ("step_by", 3)])).unwrap(),
            serde_json::json!([1, 4, 7])
        );
        assert!(bounded_range(&args(&[("end", 1_000_000_000)])).is_err());
        assert!(bounded_range(&args(&[("end", 5), ("step_by", 0)])).is_err());
    }

    #[test]
    fn numbers_get_thousands_separators() {
        let render = |v: Value| number_filter(&v, &HashMap::new()).unwrap();
        assert_eq!(render(12000.into()), "12,000");
        assert_eq!(render(999.into()), "999");
        assert_eq!(render((-1234567).into()), "-1,234,567");
        assert_eq!(render(1234.5.into()), "1,234.50");
        assert!(number_filter(&Value::Bool(true), &HashMap::new()).is_err());
    }

    #[test]
    fn the_money_and_mrkdwn_filters_render_as_the_macros_they_replace_do() {
        let mut tera = parse_dir(&manifest("templates")).unwrap();
        tera.add_raw_templates([
            (
                "filters",
                "{{ data.amount | money(currency=data.currency, locale=locale) }}|\
                 {{ data.reason | mrkdwn }}|{{ data.count | mrkdwn }}",
            ),
            (
                "macros",
                "{%- import \"_macros/money.txt\" as money -%}\
                 {%- import \"_macros/slack.txt\" as slack -%}\
                 {{ money::format(amount=data.amount, currency=data.currency, locale=locale) }}|\
                 {{ slack::escape(text=data.reason) }}|{{ slack::escape(text=data.count) }}",
            ),
        ])
        .unwrap();
        let cases = [
            ("ko", json!(12000), "KRW", "12,000원"),
            ("en", json!(12000), "KRW", "12,000 KRW"),
            ("ko", json!("19.99"), "USD", "19.99 USD"),
            ("en", json!(1234.5), "USD", "1,234.50 USD"),
        ];
        for (locale, amount, currency, money) in cases {
            let mut context = context(json!({
                "amount": amount, "currency": currency,
                "reason": "<!channel> & <https://x.test|click>", "count": 3,
            }));
            context.insert("locale", locale);
            let expected = format!("{money}|&lt;!channel&gt; &amp; &lt;https://x.test|click&gt;|3");
            for name in ["filters", "macros"] {
                assert_eq!(tera.render(name, &context).unwrap(), expected, "{name}");
            }
        }
        let mut context = context(json!({ "amount": 5, "currency": 7, "reason": [1] }));
        context.insert("locale", "en");
        let error = tera.render("filters", &context).unwrap_err();
        assert!(
            error_chain(&error).contains("money: the currency is a number"),
            "{error:?}"
        );
        let only = tera::Tera::one_off("{{ v | mrkdwn }}", &context, false);
        assert!(only.is_err(), "the filter is Herald's, not tera's");
        assert!(mrkdwn_filter(&json!([1]), &HashMap::new()).is_err());
    }

    #[test]
    fn decimal_strings_are_grouped_and_keep_their_fraction_as_written() {
        let render = |s: &str| number_filter(&json!(s), &HashMap::new()).unwrap();
        assert_eq!(render("19.99"), "19.99");
        assert_eq!(render("1234567.5"), "1,234,567.5");
        assert_eq!(render("12000"), "12,000");
        assert_eq!(render("-1234.50"), "-1,234.50");
        assert_eq!(render("99999999999999999999"), "99,999,999,999,999,999,999");
        for not_a_number in ["", "1.", ".5", "1e5", "NaN", "inf", "1,000", "12 000", "+1"] {
            assert!(
                number_filter(&json!(not_a_number), &HashMap::new()).is_err(),
                "{not_a_number:?}"
            );
        }
    }
}
