//! How long a channel's sends take, and so whether they may go out inside the transaction
//! that finds their deliveries ([`super::worker::Dispatcher::send_locked`]) instead of
//! under a claim's lease.
//!
//! A send inside that transaction saves the claim: a row version of the delivery (with
//! its index entries) and a statement per batch. On the bench, with SLACK sent to a local
//! receiver that way as IN_APP already was, an event of two deliveries went from 9.2 to
//! 7.3 row versions and used 9 % less CPU end to end (BENCHMARKS.md). But the transaction
//! holds the deliveries' rows, a pooled connection and PostgreSQL's oldest running
//! transaction until every send of its batch has answered, and it cuts off a send after
//! two seconds (a retryable timeout). So a channel sends that way only while its sends are
//! quick: the moving average of its latencies at or under the configured quick time
//! (`dispatch.quick_send_ms`, 50 ms by default), over at least [`MIN_SAMPLES`] sends. It
//! starts under claims, and goes back to them once the average passes [`SLOWER`] times the
//! quick time (a gap, so that a channel near the line does not flip at every send). A
//! provider that slows down, or one send that times out, moves it back at once: one
//! two-second sample lifts a 50 ms average past 200 ms. IN_APP, one PUBLISH to Herald's own
//! Redis, always sends inside the transaction ([`SendSpeed::always`]).

use std::{
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    time::Duration,
};

/// Sends measured before a channel may send inside its transactions.
pub const MIN_SAMPLES: u32 = 32;

/// How far above the quick time the average may go before a channel that sends inside
/// its transactions goes back to claims.
pub const SLOWER: u32 = 4;

/// The weight of each new sample in the moving average.
const WEIGHT: f64 = 1.0 / 8.0;

/// One channel's send latency, shared by its loop and its sends.
#[derive(Debug)]
pub struct SendSpeed {
    /// The quick time; zero measures nothing and keeps the way it was made.
    quick: Duration,
    /// The moving average, in microseconds, as `f64` bits.
    average_micros: AtomicU64,
    samples: AtomicU32,
    in_transaction: AtomicBool,
}

/// A change of how a channel sends, worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Its sends became quick: they go out inside the transactions that find them.
    Quick,
    /// Its sends slowed down: they are claimed under a lease again.
    Slow,
}

impl SendSpeed {
    /// A channel not measured yet, whose sends are quick at or under `quick`.
    pub fn new(quick: Duration) -> Self {
        SendSpeed {
            quick,
            average_micros: AtomicU64::new(0f64.to_bits()),
            samples: AtomicU32::new(0),
            in_transaction: AtomicBool::new(false),
        }
    }

    /// A channel whose sends always go out inside their transactions (IN_APP), whatever
    /// they take: nothing is measured.
    pub fn always() -> Self {
        SendSpeed {
            in_transaction: AtomicBool::new(true),
            ..SendSpeed::new(Duration::ZERO)
        }
    }

    /// Counts one send that reached its provider (or timed out trying); returns the change
    /// it made, if any.
    pub fn record(&self, latency: Duration) -> Option<Change> {
        if self.quick.is_zero() {
            return None;
        }
        let sample = latency.as_secs_f64() * 1e6;
        let samples = self
            .samples
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(1))
            })
            .unwrap_or(0)
            .saturating_add(1);
        // The first sample starts the average, so that it does not creep up from 0.
        let step = |bits: u64| {
            let average = f64::from_bits(bits);
            if samples == 1 {
                sample
            } else {
                average + WEIGHT * (sample - average)
            }
        };
        let previous = self
            .average_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some(step(bits).to_bits())
            })
            .unwrap_or(0);
        let average = step(previous);
        let quick = self.quick.as_secs_f64() * 1e6;
        if self.in_transaction.load(Ordering::Relaxed) {
            (average > quick * f64::from(SLOWER)
                && self.in_transaction.swap(false, Ordering::Relaxed))
            .then_some(Change::Slow)
        } else {
            (samples >= MIN_SAMPLES
                && average <= quick
                && !self.in_transaction.swap(true, Ordering::Relaxed))
            .then_some(Change::Quick)
        }
    }

    /// True while the channel's sends are quick enough to go out inside a transaction.
    pub fn is_quick(&self) -> bool {
        self.in_transaction.load(Ordering::Relaxed)
    }

    /// The moving average of the channel's send latency.
    pub fn average(&self) -> Duration {
        Duration::from_secs_f64(f64::from_bits(self.average_micros.load(Ordering::Relaxed)) / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_millis(50);

    fn sends(speed: &SendSpeed, n: u32, latency: Duration) -> Vec<Change> {
        (0..n).filter_map(|_| speed.record(latency)).collect()
    }

    #[test]
    fn a_channel_sends_in_its_transactions_only_after_enough_quick_sends() {
        let speed = SendSpeed::new(QUICK);
        assert!(sends(&speed, MIN_SAMPLES - 1, Duration::from_millis(3)).is_empty());
        assert!(!speed.is_quick());
        assert_eq!(sends(&speed, 1, Duration::from_millis(3)), [Change::Quick]);
        assert!(speed.is_quick());
        assert!(sends(&speed, 100, Duration::from_millis(3)).is_empty());
    }

    #[test]
    fn slow_sends_keep_a_channel_under_claims() {
        let speed = SendSpeed::new(QUICK);
        assert!(sends(&speed, 200, Duration::from_millis(150)).is_empty());
        assert!(!speed.is_quick());
        assert!((speed.average().as_millis() as i64 - 150).abs() <= 1);
    }

    #[test]
    fn one_timeout_sends_a_quick_channel_back_to_claims() {
        let speed = SendSpeed::new(QUICK);
        sends(&speed, MIN_SAMPLES, Duration::from_millis(5));
        assert!(speed.is_quick());
        assert_eq!(sends(&speed, 1, Duration::from_secs(2)), [Change::Slow]);
        assert!(!speed.is_quick());
        // Quick again once the average is back under the quick time.
        let back = sends(&speed, 40, Duration::from_millis(5));
        assert_eq!(back, [Change::Quick]);
    }

    #[test]
    fn an_average_between_quick_and_slow_keeps_the_way_a_channel_sends() {
        let speed = SendSpeed::new(QUICK);
        sends(&speed, MIN_SAMPLES, Duration::from_millis(40));
        assert!(speed.is_quick());
        assert!(sends(&speed, 200, Duration::from_millis(120)).is_empty());
        assert!(speed.is_quick(), "{:?}", speed.average());
        assert_eq!(
            sends(&speed, 200, Duration::from_millis(250)),
            [Change::Slow]
        );
        assert!(sends(&speed, 200, Duration::from_millis(120)).is_empty());
        assert!(!speed.is_quick());
    }

    #[test]
    fn a_quick_time_of_zero_never_sends_in_a_transaction() {
        let speed = SendSpeed::new(Duration::ZERO);
        assert!(sends(&speed, 1000, Duration::from_micros(10)).is_empty());
        assert!(!speed.is_quick());
    }

    #[test]
    fn in_app_always_sends_in_its_transactions() {
        let speed = SendSpeed::always();
        assert!(speed.is_quick());
        assert!(sends(&speed, 10, Duration::from_secs(2)).is_empty());
        assert!(speed.is_quick());
    }
}
