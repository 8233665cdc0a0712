//! A circuit breaker per channel, per instance: after `threshold` consecutive failures the
//! channel is left alone for a cooldown, then one probe is let through; its success closes
//! the breaker, its failure opens it again.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// What the breaker allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Closed: send.
    Send,
    /// Half-open: send this one as the probe.
    Probe,
    /// Open (or a probe is out): do not send for this long.
    Refuse(Duration),
}

/// A change of state worth announcing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_out: bool },
}

/// One channel's breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        CircuitBreaker {
            threshold,
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// How long the breaker will refuse sends from now, without taking a probe permit:
    /// `None` when a send (or a probe) would be let through.
    pub fn refusing_for(&self) -> Option<Duration> {
        match *self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Open { until } => until.checked_duration_since(Instant::now()),
            State::HalfOpen { probe_out: true } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Whether the breaker is closed: every send goes through, and none is a probe.
    pub fn is_closed(&self) -> bool {
        matches!(
            *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            State::Closed { .. }
        )
    }

    /// Asks to send.
    pub fn permit(&self) -> Permit {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match *state {
            State::Closed { .. } => Permit::Send,
            State::Open { until } => {
                let now = Instant::now();
                if now >= until {
                    *state = State::HalfOpen { probe_out: true };
                    Permit::Probe
                } else {
                    Permit::Refuse(until - now)
                }
            }
            State::HalfOpen { probe_out: false } => {
                *state = State::HalfOpen { probe_out: true };
                Permit::Probe
            }
            State::HalfOpen { probe_out: true } => Permit::Refuse(Duration::from_secs(1)),
        }
    }

    /// Reports a send's outcome: `failed` for failures that say the channel is unwell
    /// (retryable ones), not for a bad address.
    pub fn record(&self, failed: bool) -> Option<Transition> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (next, transition) = match (*state, failed) {
            (State::Closed { .. }, false) => (State::Closed { failures: 0 }, None),
            (State::Closed { failures }, true) if failures + 1 >= self.threshold => (
                State::Open {
                    until: Instant::now() + self.cooldown,
                },
                Some(Transition::Opened),
            ),
            (State::Closed { failures }, true) => (
                State::Closed {
                    failures: failures + 1,
                },
                None,
            ),
            (State::HalfOpen { .. }, false) => {
                (State::Closed { failures: 0 }, Some(Transition::Closed))
            }
            (State::HalfOpen { .. }, true) => (
                State::Open {
                    until: Instant::now() + self.cooldown,
                },
                None,
            ),
            // A send that started before the breaker opened: no new information.
            (open @ State::Open { .. }, _) => (open, None),
        };
        *state = next;
        transition
    }

    /// Gives back a probe permit that was not used (the send was deferred).
    pub fn release_probe(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == (State::HalfOpen { probe_out: true }) {
            *state = State::HalfOpen { probe_out: false };
        }
    }

    /// 0 closed, 1 open, 2 half-open (the `herald_circuit_state` gauge).
    pub fn gauge(&self) -> f64 {
        match *self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Closed { .. } => 0.0,
            State::Open { .. } => 1.0,
            State::HalfOpen { .. } => 2.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_probes_after_the_cooldown_and_closes_on_success() {
        let breaker = CircuitBreaker::new(3, Duration::from_millis(50));
        assert_eq!(breaker.record(true), None);
        assert_eq!(breaker.record(true), None);
        assert_eq!(breaker.permit(), Permit::Send);
        assert_eq!(breaker.record(true), Some(Transition::Opened));
        assert!(matches!(breaker.permit(), Permit::Refuse(_)));

        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(breaker.permit(), Permit::Probe);
        assert!(
            matches!(breaker.permit(), Permit::Refuse(_)),
            "one probe at a time"
        );
        assert_eq!(breaker.record(false), Some(Transition::Closed));
        assert_eq!(breaker.permit(), Permit::Send);
    }

    #[test]
    fn a_success_resets_the_count_and_a_failed_probe_reopens() {
        let breaker = CircuitBreaker::new(2, Duration::from_millis(20));
        breaker.record(true);
        breaker.record(false);
        assert_eq!(breaker.record(true), None, "the count restarted");
        assert_eq!(breaker.record(true), Some(Transition::Opened));
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(breaker.permit(), Permit::Probe);
        assert_eq!(breaker.record(true), None);
        assert!(matches!(breaker.permit(), Permit::Refuse(_)));
    }
}
