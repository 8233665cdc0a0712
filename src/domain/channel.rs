use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A way to reach someone. The names are the wire and database form.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Channel {
    Email,
    Slack,
    InApp,
    Sms,
    Kakaotalk,
    Push,
}

impl Channel {
    /// Every channel.
    pub const ALL: [Channel; 6] = [
        Channel::Email,
        Channel::Slack,
        Channel::InApp,
        Channel::Sms,
        Channel::Kakaotalk,
        Channel::Push,
    ];

    /// The wire and database name (`EMAIL`, `IN_APP`...).
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "EMAIL",
            Channel::Slack => "SLACK",
            Channel::InApp => "IN_APP",
            Channel::Sms => "SMS",
            Channel::Kakaotalk => "KAKAOTALK",
            Channel::Push => "PUSH",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Channel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Channel::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown channel {s:?} (expected one of EMAIL, SLACK, IN_APP, SMS, KAKAOTALK, PUSH)"
                )
            })
    }
}
