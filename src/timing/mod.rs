//! Time-aware delivery (issue 18): when a delivery may go out, beyond "as soon as it can".
//!
//! - [`quiet_hours`]: periods of the day, in the user's time zone, when deliveries wait
//!   for the window to open. Decided when the delivery is created (its due time is the
//!   window's opening), from the user's own quiet hours or the event type's default.
//! - [`frequency_cap`]: at most N sends per user and channel in a sliding window, counted
//!   in Redis by every instance; checked by the dispatcher just before a send.
//! - [`digest`]: events of a type gathered per user for a window, then sent as one
//!   message per channel that lists them.
//!
//! Event types marked critical in the routing file bypass quiet hours and caps. A
//! delivery that waits is PENDING with its due time (`nextAttemptAt`) and a [`Hold`]
//! saying why, on `GET /api/v1/notifications/{id}`, in its delivery event and in the
//! history.

pub mod digest;
pub mod frequency_cap;
pub mod quiet_hours;

use serde::{Deserialize, Serialize};

/// Why a PENDING delivery waits past its creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// The caller asked for later (`scheduledAt`).
    Scheduled,
    /// The user's quiet hours: it goes when they end.
    QuietHours,
    /// Over a frequency cap: it goes when the cap has room.
    FrequencyCapped,
    /// Gathered into a digest: it goes, with the others, when the digest's window closes.
    Digest,
    /// Over the channel's rate limit.
    RateLimited,
    /// The channel's circuit breaker is open.
    CircuitOpen,
}

impl Hold {
    pub fn as_str(self) -> &'static str {
        match self {
            Hold::Scheduled => "scheduled",
            Hold::QuietHours => "quiet_hours",
            Hold::FrequencyCapped => "frequency_capped",
            Hold::Digest => "digest",
            Hold::RateLimited => "rate_limited",
            Hold::CircuitOpen => "circuit_open",
        }
    }
}
