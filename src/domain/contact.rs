use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// An email address, checked for shape (one `@`, a non-empty local part, a dotted or
/// single-label domain, no spaces or control characters, at most 254 bytes). Deliverability
/// is the mail server's business.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EmailAddress(String);

impl EmailAddress {
    /// Parses untrusted input.
    pub fn parse(input: &str) -> Result<Self, String> {
        let address = input.trim();
        let bad = || format!("{address:?} is not an email address");
        if address.len() > 254 || address.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let (local, domain) = address.rsplit_once('@').ok_or_else(bad)?;
        let label_ok = |label: &str| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        };
        if local.is_empty()
            || local.len() > 64
            || local.contains(['@', '<', '>', '(', ')', ',', ';', ':', '\\', '"', '[', ']'])
            || !domain.split('.').all(label_ok)
        {
            return Err(bad());
        }
        Ok(EmailAddress(address.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A phone number in E.164 form: `+`, then 8 to 15 digits. Spaces and dashes are removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    /// Parses untrusted input.
    pub fn parse(input: &str) -> Result<Self, String> {
        let compact: String = input
            .trim()
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '(' | ')'))
            .collect();
        match compact.strip_prefix('+') {
            Some(digits)
                if (8..=15).contains(&digits.len())
                    && digits.chars().all(|c| c.is_ascii_digit()) =>
            {
                Ok(PhoneNumber(compact))
            }
            _ => Err(format!(
                "{input:?} is not a phone number in E.164 form such as +821012345678"
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A language Herald has templates for.
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
#[serde(rename_all = "lowercase")]
pub enum Locale {
    Ko,
    En,
}

impl Locale {
    /// The template folder and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Locale::Ko => "ko",
            Locale::En => "en",
        }
    }
}

impl FromStr for Locale {
    type Err = String;

    /// Accepts a language tag (`ko`, `ko-KR`, `en_US`) and keeps its language.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let language = input
            .trim()
            .split(['-', '_'])
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match language.as_str() {
            "ko" => Ok(Locale::Ko),
            "en" => Ok(Locale::En),
            _ => Err(format!("unsupported locale {input:?} (expected ko or en)")),
        }
    }
}

impl fmt::Display for Locale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IANA time zone name such as `Asia/Seoul`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Timezone(String);

impl Timezone {
    /// Parses untrusted input against the IANA database.
    pub fn parse(input: &str) -> Result<Self, String> {
        input
            .trim()
            .parse::<chrono_tz::Tz>()
            .map(|tz| Timezone(tz.name().to_owned()))
            .map_err(|_| format!("{input:?} is not an IANA time zone such as Asia/Seoul"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A targeting tag on a user (`vip`, `beta-tester`, `region:seoul`): 1 to 64 characters of
/// letters, digits and `-_.:`, kept in lower case so that `VIP` and `vip` are one tag.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(try_from = "String")]
pub struct Tag(String);

impl TryFrom<String> for Tag {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Tag::parse(&text)
    }
}

impl Tag {
    /// Parses untrusted input.
    pub fn parse(input: &str) -> Result<Self, String> {
        let tag = input.trim().to_lowercase();
        if tag.is_empty()
            || tag.chars().count() > 64
            || !tag
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err(format!(
                "{input:?} is not a tag (1 to 64 letters, digits and -_.:)"
            ));
        }
        Ok(Tag(tag))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The year a user was born, for age segments: from 1900 to this year.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct BirthYear(i32);

impl BirthYear {
    /// Parses untrusted input.
    pub fn new(year: i64) -> Result<Self, String> {
        let this_year = i64::from(chrono::Datelike::year(&chrono::Utc::now()));
        if (1900..=this_year).contains(&year) {
            Ok(BirthYear(year as i32))
        } else {
            Err(format!(
                "birthYear {year} is not between 1900 and {this_year}"
            ))
        }
    }

    pub fn get(self) -> i32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_case_folded_and_checked() {
        assert_eq!(Tag::parse(" VIP ").unwrap().as_str(), "vip");
        assert_eq!(Tag::parse("region:seoul").unwrap().as_str(), "region:seoul");
        for bad in ["", "two words", "a/b", &"x".repeat(65)] {
            assert!(Tag::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn birth_years_are_plausible() {
        assert_eq!(BirthYear::new(1990).unwrap().get(), 1990);
        assert!(BirthYear::new(1899).is_err());
        assert!(BirthYear::new(3000).is_err());
    }

    #[test]
    fn email_addresses_are_checked_for_shape() {
        for good in ["a@b.c", "user.name+tag@example.co.kr", "x@localhost"] {
            assert!(EmailAddress::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "", "plain", "@b.c", "a@", "a b@c.d", "a@b..c", "a@-b.c", "<a@b.c>",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn phone_numbers_must_be_e164() {
        assert_eq!(
            PhoneNumber::parse("+82 10-1234-5678").unwrap().as_str(),
            "+821012345678"
        );
        for bad in ["01012345678", "+82", "+82abc12345", "+1234567890123456"] {
            assert!(PhoneNumber::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn locales_keep_the_language_of_a_tag() {
        assert_eq!("ko-KR".parse::<Locale>(), Ok(Locale::Ko));
        assert_eq!("EN_us".parse::<Locale>(), Ok(Locale::En));
        assert!("fr".parse::<Locale>().is_err());
    }

    #[test]
    fn time_zones_come_from_the_iana_database() {
        assert_eq!(
            Timezone::parse("Asia/Seoul").unwrap().as_str(),
            "Asia/Seoul"
        );
        assert!(Timezone::parse("Mars/Olympus").is_err());
    }
}
