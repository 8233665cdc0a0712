//! The life of one alert, as a pure function of what each round observes: no I/O, so the
//! hysteresis is tested without a clock or a database.
//!
//! ok ──breached──► pending ──breached for `for`──► firing ──clear for `resolve_after`──► ok
//!                     └──────────clear──────────► ok      (a breach while clearing resets it)
//!
//! What the ops Slack has been told is kept beside the status, apart from it: a round
//! announces the difference between the two ([`Track::due`]) and records it only once the
//! post succeeded, so an announcement that failed is made by a later round.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Where an alert stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The condition does not hold (or a firing alert's condition has been clear long enough).
    Ok,
    /// The condition holds, not yet for the rule's `for`.
    Pending,
    /// The condition has held for the rule's `for`, and has not been clear for `resolve_after`.
    Firing,
}

impl Status {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Pending => "pending",
            Status::Firing => "firing",
        }
    }

    /// The status of a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        [Status::Ok, Status::Pending, Status::Firing]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// What was last announced on the ops Slack about an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Announcement {
    Firing,
    Resolved,
}

impl Announcement {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Announcement::Firing => "firing",
            Announcement::Resolved => "resolved",
        }
    }

    /// The announcement of a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        [Announcement::Firing, Announcement::Resolved]
            .into_iter()
            .find(|a| a.as_str() == text)
    }
}

/// How long a condition must hold before an alert fires, and stay clear before it resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub fire_after: Duration,
    pub resolve_after: Duration,
}

/// One alert's state between rounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Track {
    pub status: Status,
    /// When the status began (for pending: when the condition started holding).
    pub since: DateTime<Utc>,
    /// While firing: since when the condition has been clear, if it is.
    pub clear_since: Option<DateTime<Utc>>,
    /// What the ops Slack was last told, and when.
    pub announced: Option<Announcement>,
    pub announced_at: Option<DateTime<Utc>>,
}

impl Track {
    /// A new alert, ok since `now`, never announced.
    pub fn new(now: DateTime<Utc>) -> Self {
        Track {
            status: Status::Ok,
            since: now,
            clear_since: None,
            announced: None,
            announced_at: None,
        }
    }

    /// The state after a round at `now` that saw the condition `breached` or not.
    pub fn step(&self, breached: bool, now: DateTime<Utc>, timing: Timing) -> Track {
        let held = |since: DateTime<Utc>, d: Duration| {
            (now - since).to_std().unwrap_or(Duration::ZERO) >= d
        };
        let to = |status, since| Track {
            status,
            since,
            clear_since: None,
            ..self.clone()
        };
        match (self.status, breached) {
            (Status::Ok, false) => self.clone(),
            (Status::Ok, true) if timing.fire_after.is_zero() => to(Status::Firing, now),
            (Status::Ok, true) => to(Status::Pending, now),
            (Status::Pending, true) if held(self.since, timing.fire_after) => {
                to(Status::Firing, now)
            }
            (Status::Pending, true) => self.clone(),
            (Status::Pending, false) => to(Status::Ok, now),
            (Status::Firing, true) => Track {
                clear_since: None,
                ..self.clone()
            },
            (Status::Firing, false) => {
                let clear_since = self.clear_since.unwrap_or(now);
                if held(clear_since, timing.resolve_after) {
                    to(Status::Ok, now)
                } else {
                    Track {
                        clear_since: Some(clear_since),
                        ..self.clone()
                    }
                }
            }
        }
    }

    /// The announcement this state still owes the ops Slack, if any: FIRING once for a
    /// firing alert, RESOLVED once for one that stopped firing after its FIRING went out.
    /// An alert that fired and resolved while every post failed owes nothing: its episode
    /// is on GET /api/v1/admin/alerts and in the metrics, and a late pair of messages about
    /// an incident already over would only confuse.
    pub fn due(&self) -> Option<Announcement> {
        match (self.status, self.announced) {
            (Status::Firing, Some(Announcement::Firing)) => None,
            (Status::Firing, _) => Some(Announcement::Firing),
            (_, Some(Announcement::Firing)) => Some(Announcement::Resolved),
            _ => None,
        }
    }

    /// This state once `announcement` went out at `at`.
    pub fn announced(&self, announcement: Announcement, at: DateTime<Utc>) -> Track {
        Track {
            announced: Some(announcement),
            announced_at: Some(at),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        fire_after: Duration::from_secs(120),
        resolve_after: Duration::from_secs(300),
    };

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    /// Runs rounds every 30 s over `conditions`, announcing whatever is due; returns the
    /// announcements made, with their round's time.
    fn run(conditions: &[bool]) -> (Track, Vec<(i64, Announcement)>) {
        let mut track = Track::new(at(0));
        let mut said = Vec::new();
        for (round, breached) in conditions.iter().enumerate() {
            let now = at(30 * round as i64);
            track = track.step(*breached, now, TIMING);
            if let Some(a) = track.due() {
                said.push((30 * round as i64, a));
                track = track.announced(a, now);
            }
        }
        (track, said)
    }

    #[test]
    fn a_condition_fires_once_after_holding_for_its_for_and_resolves_once_after_staying_clear() {
        // Breached from 0 s to 270 s, clear afterwards.
        let conditions: Vec<bool> = (0..30).map(|round| round < 10).collect();
        let (track, said) = run(&conditions);
        assert_eq!(
            said,
            vec![(120, Announcement::Firing), (600, Announcement::Resolved)]
        );
        assert_eq!(track.status, Status::Ok);
        assert_eq!(track.due(), None);
    }

    #[test]
    fn a_breach_shorter_than_for_never_fires() {
        let (track, said) = run(&[true, true, true, false, true, false, false]);
        assert!(said.is_empty(), "{said:?}");
        assert_eq!(track.status, Status::Ok);
    }

    #[test]
    fn flapping_while_firing_neither_resolves_nor_announces_again() {
        // Fires at 120 s, then alternates clear and breached: each breach resets the clearing.
        let mut conditions = vec![true; 5];
        conditions.extend((0..40).map(|i| i % 2 == 0));
        let (track, said) = run(&conditions);
        assert_eq!(said, vec![(120, Announcement::Firing)]);
        assert_eq!(track.status, Status::Firing);
    }

    #[test]
    fn a_failed_announcement_is_due_again_next_round() {
        let mut track = Track::new(at(0));
        track = track.step(true, at(0), TIMING).step(true, at(120), TIMING);
        assert_eq!(track.status, Status::Firing);
        assert_eq!(track.due(), Some(Announcement::Firing));
        // The post failed: nothing recorded, so the next round owes it still.
        track = track.step(true, at(150), TIMING);
        assert_eq!(track.due(), Some(Announcement::Firing));
        track = track.announced(Announcement::Firing, at(150));
        assert_eq!(track.step(true, at(180), TIMING).due(), None);
    }

    #[test]
    fn a_zero_for_fires_in_the_first_round_that_sees_the_breach() {
        let timing = Timing {
            fire_after: Duration::ZERO,
            resolve_after: Duration::ZERO,
        };
        let track = Track::new(at(0)).step(true, at(30), timing);
        assert_eq!(track.status, Status::Firing);
        assert_eq!(track.since, at(30));
        assert_eq!(track.step(false, at(60), timing).status, Status::Ok);
    }
}
