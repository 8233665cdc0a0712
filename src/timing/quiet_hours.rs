//! Quiet hours: periods of the day, in the user's own time zone, when a delivery waits
//! instead of going out (issue 18).
//!
//! A window is two wall-clock times, `from` and `to`, read in the user's time zone on
//! every day; `from` later than `to` spans midnight (22:00-08:00). Wall-clock times make
//! daylight-saving changes come out as a person expects: 22:00-08:00 in London ends at
//! 08:00 local on the morning after the clocks moved, whichever offset that is. A `to`
//! that does not exist that day (inside a spring-forward gap) ends the window when the gap
//! ends; one that exists twice (a fall-back hour) ends it at its first occurrence.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::domain::Channel;

/// A wall-clock time of day, minutes precision, written `HH:MM` (24-hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClockTime(NaiveTime);

impl ClockTime {
    /// Parses `HH:MM` (00:00 to 23:59).
    pub fn parse(input: &str) -> Result<Self, String> {
        let valid = input.len() == 5 && input.as_bytes()[2] == b':';
        valid
            .then(|| NaiveTime::parse_from_str(input, "%H:%M").ok())
            .flatten()
            .map(ClockTime)
            .ok_or_else(|| format!("{input:?} is not a time of day such as 22:00 (HH:MM, 24-hour)"))
    }

    fn get(self) -> NaiveTime {
        self.0
    }
}

impl Serialize for ClockTime {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.format("%H:%M").to_string())
    }
}

impl<'de> Deserialize<'de> for ClockTime {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ClockTime::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// One quiet period of every day, in the user's time zone, for some channels or all of
/// them; `from` later than `to` spans midnight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuietWindow {
    /// When the quiet period starts, `HH:MM` (24-hour).
    #[schema(value_type = String, pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$", example = "22:00")]
    pub from: ClockTime,
    /// When it ends, `HH:MM` (24-hour).
    #[schema(value_type = String, pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$", example = "08:00")]
    pub to: ClockTime,
    /// The channels it holds back; absent means every channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<BTreeSet<Channel>>,
}

impl QuietWindow {
    /// Checks what serde cannot: a window of no length means nothing, and is refused.
    pub fn validate(&self) -> Result<(), String> {
        if self.from == self.to {
            return Err(format!(
                "a quiet window from {0} to {0} is empty; give two different times",
                self.from.get().format("%H:%M")
            ));
        }
        if self.channels.as_ref().is_some_and(BTreeSet::is_empty) {
            return Err("a quiet window's channels, when given, name at least one".to_owned());
        }
        Ok(())
    }

    fn applies_to(&self, channel: Channel) -> bool {
        self.channels.as_ref().is_none_or(|c| c.contains(&channel))
    }

    /// When this window, if `local` falls in it, ends (local wall-clock time).
    fn end_after(&self, local: NaiveDateTime) -> Option<NaiveDateTime> {
        let (from, to, time) = (self.from.get(), self.to.get(), local.time());
        let inside = if from < to {
            from <= time && time < to
        } else {
            time >= from || time < to
        };
        if !inside {
            return None;
        }
        let day = if time < to {
            local.date()
        } else {
            local.date().succ_opt()?
        };
        Some(day.and_time(to))
    }
}

/// The first instant at or after `at` when `channel` is outside every window that applies
/// to it, in time zone `tz`; `None` when `at` itself is outside them (send now).
pub fn opening(
    windows: &[QuietWindow],
    channel: Channel,
    tz: Tz,
    at: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let mut due = at;
    // Windows can overlap or follow each other: move past each in turn (a bounded number
    // of times, since every window is shorter than a day).
    for _ in 0..=windows.len() * 2 {
        let local = due.with_timezone(&tz).naive_local();
        let Some(end) = windows
            .iter()
            .filter(|w| w.applies_to(channel))
            .filter_map(|w| w.end_after(local))
            .max()
        else {
            return (due != at).then_some(due);
        };
        due = instant_after(tz, end, due);
    }
    Some(due)
}

/// The instant a wall-clock time names in `tz`, after `after`: the end of the gap when the
/// clocks jumped over it, and when they went back its first occurrence, or its second if
/// the first is not after `after` (a window entered during the repeated hour).
fn instant_after(tz: Tz, local: NaiveDateTime, after: DateTime<Utc>) -> DateTime<Utc> {
    let mut candidate = local;
    // A gap is at most a few hours long; minute steps find its end.
    for _ in 0..=24 * 60 {
        match tz.from_local_datetime(&candidate) {
            LocalResult::Single(t) => return t.with_timezone(&Utc).max(after),
            LocalResult::Ambiguous(first, second) => {
                let first = first.with_timezone(&Utc);
                return if first > after {
                    first
                } else {
                    second.with_timezone(&Utc).max(after)
                };
            }
            LocalResult::None => candidate += Duration::minutes(1),
        }
    }
    Utc.from_utc_datetime(&local).max(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(from: &str, to: &str) -> QuietWindow {
        QuietWindow {
            from: ClockTime::parse(from).unwrap(),
            to: ClockTime::parse(to).unwrap(),
            channels: None,
        }
    }

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn an_event_at_23_30_in_seoul_waits_for_08_00_seoul() {
        let tz: Tz = "Asia/Seoul".parse().unwrap();
        let night = [window("22:00", "08:00")];
        // 23:30 KST is 14:30 UTC; 08:00 KST the next day is 23:00 UTC.
        assert_eq!(
            opening(&night, Channel::Email, tz, utc("2026-12-01T14:30:00Z")),
            Some(utc("2026-12-01T23:00:00Z"))
        );
        // 03:00 KST: the same morning's 08:00.
        assert_eq!(
            opening(&night, Channel::Email, tz, utc("2026-12-01T18:00:00Z")),
            Some(utc("2026-12-01T23:00:00Z"))
        );
        // 12:00 KST: outside, goes now.
        assert_eq!(
            opening(&night, Channel::Email, tz, utc("2026-12-01T03:00:00Z")),
            None
        );
        // 08:00 sharp is outside; 22:00 sharp is inside.
        assert_eq!(
            opening(&night, Channel::Email, tz, utc("2026-12-01T23:00:00Z")),
            None
        );
        assert_eq!(
            opening(&night, Channel::Email, tz, utc("2026-12-01T13:00:00Z")),
            Some(utc("2026-12-01T23:00:00Z"))
        );
    }

    #[test]
    fn london_windows_end_at_local_eight_across_both_changes() {
        let tz: Tz = "Europe/London".parse().unwrap();
        let night = [window("22:00", "08:00")];
        // Clocks go forward at 01:00 GMT on 2026-03-29: 08:00 BST is 07:00 UTC.
        assert_eq!(
            opening(&night, Channel::Push, tz, utc("2026-03-28T23:00:00Z")),
            Some(utc("2026-03-29T07:00:00Z"))
        );
        // Clocks go back at 01:00 GMT on 2026-10-25: 23:00 BST on the 24th is 22:00 UTC,
        // and 08:00 GMT on the 25th is 08:00 UTC.
        assert_eq!(
            opening(&night, Channel::Push, tz, utc("2026-10-24T22:00:00Z")),
            Some(utc("2026-10-25T08:00:00Z"))
        );
    }

    #[test]
    fn new_york_handles_the_gap_and_the_repeated_hour() {
        let tz: Tz = "America/New_York".parse().unwrap();
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT, so 02:30 does not exist; the window
        // ends when the gap does, 03:00 EDT (07:00 UTC).
        let late = [window("23:00", "02:30")];
        assert_eq!(
            opening(&late, Channel::Sms, tz, utc("2026-03-08T04:30:00Z")),
            Some(utc("2026-03-08T07:00:00Z"))
        );
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST, so 01:30 happens twice; the
        // window ends at the first (05:30 UTC), or, entered during the repeated hour, at
        // the second (06:30 UTC).
        let early = [window("23:00", "01:30")];
        assert_eq!(
            opening(&early, Channel::Sms, tz, utc("2026-11-01T04:00:00Z")),
            Some(utc("2026-11-01T05:30:00Z"))
        );
        assert_eq!(
            opening(&early, Channel::Sms, tz, utc("2026-11-01T06:00:00Z")),
            Some(utc("2026-11-01T06:30:00Z"))
        );
        // 22:00-08:00 across the fall-back night ends at 08:00 EST (13:00 UTC).
        let night = [window("22:00", "08:00")];
        assert_eq!(
            opening(&night, Channel::Sms, tz, utc("2026-11-01T03:00:00Z")),
            Some(utc("2026-11-01T13:00:00Z"))
        );
    }

    #[test]
    fn windows_apply_to_their_channels_and_chain() {
        let tz: Tz = "UTC".parse().unwrap();
        let mut push_only = window("12:00", "13:00");
        push_only.channels = Some([Channel::Push].into());
        let windows = [push_only, window("12:30", "14:00")];
        assert_eq!(
            opening(&windows, Channel::Email, tz, utc("2026-06-01T12:10:00Z")),
            None
        );
        // Inside the first, whose end is inside the second: both are passed.
        assert_eq!(
            opening(&windows, Channel::Push, tz, utc("2026-06-01T12:10:00Z")),
            Some(utc("2026-06-01T14:00:00Z"))
        );
    }

    #[test]
    fn bad_windows_are_refused() {
        assert!(ClockTime::parse("24:00").is_err());
        assert!(ClockTime::parse("7:00").is_err());
        assert!(ClockTime::parse("07:00:00").is_err());
        assert!(window("08:00", "08:00").validate().is_err());
        let json = r#"{"from": "22:00", "to": "08:00", "color": "red"}"#;
        assert!(serde_json::from_str::<QuietWindow>(json).is_err());
    }
}
