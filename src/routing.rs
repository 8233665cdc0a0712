//! Routing: which channels an event goes to (the rules of `config/routing.toml`), and for
//! each channel whether it is sent, to which address, or skipped and why (user
//! preferences, the user directory, which channels are configured); and each event type's
//! timing policy (quiet hours, frequency caps, digests: [`crate::timing`]).

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
};

use anyhow::Context;
use chrono_tz::Tz;
use serde::Deserialize;

use crate::{
    domain::{Channel, Domain, EmailAddress, EventType, Locale, PhoneNumber, UserId},
    preferences::Preferences,
    timing::{digest::DigestRule, frequency_cap::FrequencyCap, quiet_hours::QuietWindow},
};

/// The routing rules.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    routes: HashMap<(Domain, EventType), Vec<Channel>>,
    operator_channels: BTreeSet<Channel>,
    default_locale: Locale,
    default_timezone: Tz,
    policies: HashMap<EventType, Policy>,
    frequency_caps: Vec<FrequencyCap>,
}

/// How an event type's deliveries are timed (issue 18).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Goes out at once: quiet hours and frequency caps never hold it back.
    pub critical: bool,
    /// The operator's quiet hours for users who set none of their own.
    pub quiet_hours: Vec<QuietWindow>,
    /// What becomes of a send over a frequency cap.
    pub when_capped: WhenCapped,
    /// Set when events of the type are gathered into one message per user.
    pub digest: Option<DigestRule>,
}

/// What becomes of a send over a frequency cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenCapped {
    /// It waits until the cap has room (the default: nothing is lost).
    #[default]
    Defer,
    /// It is SKIPPED with the reason `frequency_capped`.
    Skip,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingFile {
    default_locale: Locale,
    /// The time zone of users the directory gives none (IANA name; default UTC).
    #[serde(default)]
    default_timezone: Option<String>,
    operator_channels: Vec<Channel>,
    #[serde(default)]
    critical_event_types: Vec<EventType>,
    #[serde(rename = "route")]
    routes: Vec<RouteEntry>,
    #[serde(default, rename = "frequency_cap")]
    frequency_caps: Vec<FrequencyCap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    domain: Domain,
    event_type: EventType,
    channels: Vec<Channel>,
    #[serde(default)]
    quiet_hours: Vec<QuietWindow>,
    #[serde(default)]
    when_capped: WhenCapped,
    #[serde(default)]
    digest: Option<DigestRule>,
}

impl RoutingTable {
    /// Reads and checks a routing file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("Failed to read the routing file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("Routing file {} is not valid", path.display()))
    }

    /// Parses routing rules from TOML text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: RoutingFile = toml::from_str(text)?;
        let mut routes = HashMap::new();
        let mut policies: HashMap<EventType, Policy> = HashMap::new();
        for entry in file.routes {
            for window in &entry.quiet_hours {
                window
                    .validate()
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("the quiet hours of {}", entry.event_type))?;
            }
            if let Some(digest) = &entry.digest {
                digest
                    .validate()
                    .with_context(|| format!("the digest of {}", entry.event_type))?;
            }
            let policy = Policy {
                critical: file.critical_event_types.contains(&entry.event_type),
                quiet_hours: entry.quiet_hours,
                when_capped: entry.when_capped,
                digest: entry.digest,
            };
            match policies.get(&entry.event_type) {
                Some(existing) => anyhow::ensure!(
                    *existing == policy,
                    "{} is routed in two domains with different quiet_hours, when_capped or \
                     digest: give the same on both",
                    entry.event_type
                ),
                None => {
                    policies.insert(entry.event_type.clone(), policy);
                }
            }
            let unique: BTreeSet<Channel> = entry.channels.iter().copied().collect();
            anyhow::ensure!(
                !entry.channels.is_empty() && unique.len() == entry.channels.len(),
                "the route of {} {} needs distinct channels",
                entry.domain,
                entry.event_type
            );
            let key = (entry.domain, entry.event_type);
            anyhow::ensure!(
                !routes.contains_key(&key),
                "{} {} is routed twice",
                key.0,
                key.1
            );
            routes.insert(key, entry.channels);
        }
        for critical in &file.critical_event_types {
            anyhow::ensure!(
                policies.contains_key(critical),
                "critical_event_types names {critical}, which no route has"
            );
        }
        for cap in &file.frequency_caps {
            cap.validate()?;
        }
        let default_timezone = match file.default_timezone.as_deref() {
            Some(name) => name.parse::<Tz>().map_err(|_| {
                anyhow::anyhow!("default_timezone {name:?} is not an IANA time zone")
            })?,
            None => Tz::UTC,
        };
        Ok(RoutingTable {
            routes,
            operator_channels: file.operator_channels.into_iter().collect(),
            default_locale: file.default_locale,
            default_timezone,
            policies,
            frequency_caps: file.frequency_caps,
        })
    }

    /// The timing policy of an event type (the default one for a type no route names).
    pub fn policy(&self, event_type: &EventType) -> &Policy {
        static NONE: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();
        self.policies
            .get(event_type)
            .unwrap_or_else(|| NONE.get_or_init(Policy::default))
    }

    /// True when some event type's deliveries are gathered into digests.
    pub fn has_digests(&self) -> bool {
        self.policies.values().any(|p| p.digest.is_some())
    }

    /// The frequency caps (`[[frequency_cap]]`).
    pub fn frequency_caps(&self) -> &[FrequencyCap] {
        &self.frequency_caps
    }

    /// The time zone of users the directory gives none.
    pub fn default_timezone(&self) -> Tz {
        self.default_timezone
    }

    /// The channels of an event type in a domain; `None` if it is not routed there.
    pub fn channels(&self, domain: Domain, event_type: &EventType) -> Option<&[Channel]> {
        self.routes
            .get(&(domain, event_type.clone()))
            .map(Vec::as_slice)
    }

    /// The channels of an event type in whichever domain routes it (for the HTTP intake,
    /// which may send any known event type).
    pub fn channels_in_any_domain(&self, event_type: &EventType) -> Option<&[Channel]> {
        let mut domains = Domain::CONSUMED.to_vec();
        domains.insert(0, Domain::Api);
        domains
            .into_iter()
            .find_map(|domain| self.channels(domain, event_type))
    }

    /// Every route: domain, event type and channels, ordered by domain then event type.
    pub fn routes(&self) -> Vec<(Domain, &EventType, &[Channel])> {
        let mut routes: Vec<_> = self
            .routes
            .iter()
            .map(|((domain, event_type), channels)| (*domain, event_type, channels.as_slice()))
            .collect();
        routes.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        routes
    }

    /// Every routed event type.
    pub fn event_types(&self) -> BTreeSet<&EventType> {
        self.routes.keys().map(|(_, t)| t).collect()
    }

    /// Every routed (event type, channel) pair.
    pub fn routed_pairs(&self) -> BTreeSet<(&EventType, Channel)> {
        self.routes
            .iter()
            .flat_map(|((_, t), channels)| channels.iter().map(move |c| (t, *c)))
            .collect()
    }

    /// True for channels addressed to operators: preferences do not apply to them.
    pub fn is_operator_channel(&self, channel: Channel) -> bool {
        self.operator_channels.contains(&channel)
    }

    /// The language when neither the event nor the directory gives one.
    pub fn default_locale(&self) -> Locale {
        self.default_locale
    }
}

/// Where a user can be reached, after the event's recipient has overridden the directory.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    pub user_id: Option<UserId>,
    pub email: Option<EmailAddress>,
    pub phone: Option<PhoneNumber>,
}

/// What will happen to one channel of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDelivery {
    pub channel: Channel,
    /// Where it goes: an email address, a phone number, `user:{id}`, or `ops`.
    pub address: Option<String>,
    /// `Some(reason)` for a delivery that will be SKIPPED.
    pub skip_reason: Option<String>,
}

/// When a user's deliveries may go out: their quiet hours (their own, else the event
/// type's default) in their time zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendWindows {
    pub quiet_hours: Vec<QuietWindow>,
    pub timezone: Tz,
}

impl SendWindows {
    /// The windows that apply to an event type's deliveries for a user: none for a
    /// critical type, the user's own if they set any (even none), else the type's default.
    pub fn for_user(
        table: &RoutingTable,
        event_type: &EventType,
        preferences: &Preferences,
        timezone: Option<Tz>,
    ) -> Self {
        let policy = table.policy(event_type);
        let quiet_hours = if policy.critical {
            Vec::new()
        } else {
            preferences
                .quiet_hours
                .clone()
                .unwrap_or_else(|| policy.quiet_hours.clone())
        };
        SendWindows {
            quiet_hours,
            timezone: timezone.unwrap_or(table.default_timezone()),
        }
    }
}

/// Decides each channel's fate. The order of checks gives the most useful reason first:
/// a channel switched off for everyone, then the user's choice, then a missing address.
pub fn plan(
    table: &RoutingTable,
    channels: &[Channel],
    event_type: &EventType,
    reach: &Reach,
    preferences: &Preferences,
    enabled: &dyn Fn(Channel) -> bool,
) -> Vec<PlannedDelivery> {
    channels
        .iter()
        .map(|&channel| {
            let skipped = |reason: String| PlannedDelivery {
                channel,
                address: None,
                skip_reason: Some(reason),
            };
            if !enabled(channel) {
                return skipped(format!(
                    "channel {channel} is not configured on this Herald"
                ));
            }
            let operator = table.is_operator_channel(channel);
            if !operator && !preferences.allows(channel, event_type) {
                return skipped(format!("user opted out of {channel} for {event_type}"));
            }
            let user = reach.user_id.map(|u| format!("user:{u}"));
            let address = match channel {
                _ if operator => Some("ops".to_owned()),
                Channel::Email => reach.email.as_ref().map(|e| e.as_str().to_owned()),
                Channel::Sms | Channel::Kakaotalk => {
                    reach.phone.as_ref().map(|p| p.as_str().to_owned())
                }
                Channel::InApp | Channel::Push | Channel::Slack => user,
            };
            match address {
                Some(address) => PlannedDelivery {
                    channel,
                    address: Some(address),
                    skip_reason: None,
                },
                None => skipped(match channel {
                    Channel::Email => "no email address for the recipient".to_owned(),
                    Channel::Sms | Channel::Kakaotalk => {
                        "no phone number for the recipient".to_owned()
                    }
                    _ => format!("{channel} needs a userId"),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RoutingTable {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/routing.toml");
        RoutingTable::load(&path).unwrap()
    }

    fn event(name: &str) -> EventType {
        EventType::parse(name).unwrap()
    }

    #[test]
    fn the_default_file_routes_design_table_two() {
        let table = table();
        let channels = |domain, name| table.channels(domain, &event(name)).unwrap().to_vec();

        assert_eq!(
            channels(Domain::Payment, "PAYMENT_FAILED"),
            [Channel::Email, Channel::InApp, Channel::Slack]
        );
        assert_eq!(channels(Domain::Order, "ORDER_COMPLETED"), [Channel::Email]);
        assert_eq!(channels(Domain::Api, "SYSTEM_INCIDENT"), [Channel::Slack]);
        assert!(
            table
                .channels(Domain::Order, &event("PAYMENT_FAILED"))
                .is_none()
        );
        assert_eq!(table.event_types().len(), 10);
    }

    #[test]
    fn timing_settings_parse_and_bad_ones_are_refused_with_the_reason() {
        let base = r#"
            default_locale = "en"
            default_timezone = "Europe/London"
            operator_channels = ["SLACK"]
            critical_event_types = ["PAYMENT_FAILED"]
            [[route]]
            domain = "payment"
            event_type = "PAYMENT_FAILED"
            channels = ["EMAIL", "SLACK"]
            [[route]]
            domain = "order"
            event_type = "ORDER_SHIPPED"
            channels = ["EMAIL", "PUSH"]
            quiet_hours = [{ from = "22:00", to = "08:00", channels = ["PUSH"] }]
            when_capped = "skip"
            digest = { window_minutes = 10, key = "merchantId" }
            [[frequency_cap]]
            channel = "PUSH"
            limit = 5
            per_minutes = 60
        "#;
        let table = RoutingTable::parse(base).unwrap();
        let shipped = table.policy(&event("ORDER_SHIPPED"));
        assert!(!shipped.critical);
        assert_eq!(shipped.when_capped, WhenCapped::Skip);
        assert_eq!(shipped.digest.as_ref().unwrap().window_minutes, 10);
        assert!(table.policy(&event("PAYMENT_FAILED")).critical);
        assert_eq!(table.frequency_caps().len(), 1);
        assert_eq!(table.default_timezone(), chrono_tz::Europe::London);
        // A critical type has no quiet hours whatever the user set.
        let night = Preferences {
            quiet_hours: Some(shipped.quiet_hours.clone()),
            ..Default::default()
        };
        let critical = SendWindows::for_user(&table, &event("PAYMENT_FAILED"), &night, None);
        assert!(critical.quiet_hours.is_empty());

        for (from, to, reason) in [
            (
                r#"critical_event_types = ["PAYMENT_FAILED"]"#,
                r#"critical_event_types = ["NOPE"]"#,
                "no route",
            ),
            (
                "window_minutes = 10",
                "window_minutes = 0",
                "window_minutes",
            ),
            ("limit = 5", "limit = 0", "at least 1"),
            (r#"to = "08:00""#, r#"to = "22:00""#, "empty"),
            (r#"to = "08:00""#, r#"to = "8am""#, "HH:MM"),
            (r#""Europe/London""#, r#""Mars/Olympus""#, "IANA"),
            (
                r#"when_capped = "skip""#,
                r#"when_capped = "drop""#,
                "when_capped",
            ),
        ] {
            let text = base.replace(from, to);
            let error = format!("{:#}", RoutingTable::parse(&text).unwrap_err());
            assert!(error.contains(reason), "{to}: {error}");
        }
    }

    #[test]
    fn the_example_timing_file_parses_with_its_digest_caps_and_quiet_hours() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/routing-timing.toml");
        let table = RoutingTable::load(&path).unwrap();
        assert!(table.policy(&event("ORDER_SHIPPED")).digest.is_some());
        assert_eq!(
            table.policy(&event("ORDER_CANCELLED")).when_capped,
            WhenCapped::Skip
        );
        assert_eq!(
            table.policy(&event("PAYMENT_COMPLETED")).quiet_hours.len(),
            1
        );
        assert_eq!(table.frequency_caps().len(), 1);
        assert_eq!(table.event_types().len(), 10);
    }

    #[test]
    fn a_duplicate_route_is_refused() {
        let text = r#"
            default_locale = "en"
            operator_channels = []
            [[route]]
            domain = "order"
            event_type = "ORDER_SHIPPED"
            channels = ["EMAIL"]
            [[route]]
            domain = "order"
            event_type = "ORDER_SHIPPED"
            channels = ["IN_APP"]
        "#;
        let error = RoutingTable::parse(text).unwrap_err().to_string();
        assert!(error.contains("routed twice"), "{error}");
    }

    #[test]
    fn plans_skip_with_the_reason_and_operator_channels_ignore_preferences() {
        let table = table();
        let reach = Reach {
            user_id: Some(UserId::new(7).unwrap()),
            email: None,
            phone: None,
        };
        let mut preferences = Preferences::default();
        preferences.set_channel(Channel::InApp, false);
        preferences.set_channel(Channel::Slack, false);

        let planned = plan(
            &table,
            &[Channel::Email, Channel::InApp, Channel::Slack, Channel::Sms],
            &event("PAYMENT_FAILED"),
            &reach,
            &preferences,
            &|channel| channel != Channel::Sms,
        );

        assert_eq!(
            planned[0].skip_reason.as_deref(),
            Some("no email address for the recipient")
        );
        assert_eq!(
            planned[1].skip_reason.as_deref(),
            Some("user opted out of IN_APP for PAYMENT_FAILED")
        );
        assert_eq!(planned[2].skip_reason, None, "SLACK is an operator channel");
        assert_eq!(planned[2].address.as_deref(), Some("ops"));
        assert_eq!(
            planned[3].skip_reason.as_deref(),
            Some("channel SMS is not configured on this Herald")
        );
    }
}
