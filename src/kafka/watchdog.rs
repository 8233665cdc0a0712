//! What each consumer knows of its group membership, and when it is stuck.
//!
//! A broker can leave a consumer without partitions for good: after a session timeout
//! (a stalled broker, a network partition) Tansu's group coordinator, like a Kafka
//! coordinator that moved or fenced the member, may never hand the assignment back, and
//! librdkafka keeps waiting politely. Nothing fails, so nothing else notices: events pile
//! up unread while every dependency looks healthy. Each consumer therefore records its
//! rebalances here; the consumer loop recreates a consumer that stayed without an
//! assignment beyond the bound (`HERALD_KAFKA_ASSIGNMENT_TIMEOUT_MS`), and `/health/ready`
//! reports a group stuck beyond it.
//!
//! An empty assignment counts as one: with more members than partitions the group gave
//! this member nothing, which is a healthy answer.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde::Serialize;

/// The consumers of one instance, by full group name. Cheap to clone.
#[derive(Clone, Default)]
pub struct Watchdogs {
    consumers: Arc<Mutex<BTreeMap<String, Arc<ConsumerWatch>>>>,
}

impl Watchdogs {
    /// The watch of `group`, made on first use with its stuck `bound`.
    pub fn watch(&self, group: &str, bound: Duration) -> Arc<ConsumerWatch> {
        let mut consumers = self.consumers.lock().unwrap_or_else(|e| e.into_inner());
        consumers
            .entry(group.to_owned())
            .or_insert_with(|| Arc::new(ConsumerWatch::new(group, bound, Instant::now())))
            .clone()
    }

    /// Every consumer's state as readiness reports it, by group.
    pub fn reports(&self) -> BTreeMap<String, ConsumerReport> {
        let now = Instant::now();
        let consumers = self.consumers.lock().unwrap_or_else(|e| e.into_inner());
        consumers
            .iter()
            .map(|(group, watch)| (group.clone(), watch.report(now)))
            .collect()
    }
}

/// One consumer's membership, updated from its rebalance callbacks and its loop.
pub struct ConsumerWatch {
    group: String,
    bound: Duration,
    state: Mutex<WatchState>,
}

struct WatchState {
    /// `topic/partition` of the current assignment; `None` while it has none.
    assigned: Option<Vec<String>>,
    /// Since when the consumer has been without an assignment, across recreations.
    unassigned_since: Option<Instant>,
    /// When the current consumer was created (a recreated one gets its own chance).
    created: Instant,
    last_rebalance: Option<DateTime<Utc>>,
    /// Whether the last revocation was a lost assignment (session timeout, fenced member)
    /// rather than an orderly rebalance.
    assignment_lost: bool,
    last_fetch: Option<DateTime<Utc>>,
    /// Recreations since the consumer last held an assignment: each gives the next one
    /// longer before it is recreated again.
    attempts: u32,
    recreations: u64,
    /// Whether the consumer holds a batch its handler cannot store yet (its partitions
    /// are paused while it keeps polling).
    waiting_on_handler: bool,
}

/// A consumer's state in the readiness body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerReport {
    /// `assigned`, `rebalancing` (no assignment, within the bound) or `stuck`.
    pub state: &'static str,
    /// `topic/partition` of each assigned partition.
    pub assigned_partitions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unassigned_for_secs: Option<u64>,
    pub assignment_lost: bool,
    pub last_rebalance_at: Option<DateTime<Utc>>,
    pub last_fetch_at: Option<DateTime<Utc>>,
    pub recreations: u64,
    pub waiting_on_handler: bool,
    /// Why the consumer is not well, when it is stuck.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The longest a recreated consumer's patience grows to, in multiples of the bound.
const MAX_PATIENCE_FACTOR: u32 = 8;

impl ConsumerWatch {
    fn new(group: &str, bound: Duration, now: Instant) -> Self {
        ConsumerWatch {
            group: group.to_owned(),
            bound,
            state: Mutex::new(WatchState {
                assigned: None,
                unassigned_since: Some(now),
                created: now,
                last_rebalance: None,
                assignment_lost: false,
                last_fetch: None,
                attempts: 0,
                recreations: 0,
                waiting_on_handler: false,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The full group name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// A new consumer was created for the group.
    pub fn created(&self, now: Instant) {
        self.state().created = now;
    }

    /// The group gave this member `partitions` (possibly none).
    pub fn assigned(&self, partitions: Vec<String>) {
        let mut state = self.state();
        state.assigned = Some(partitions);
        state.unassigned_since = None;
        state.assignment_lost = false;
        state.attempts = 0;
        state.last_rebalance = Some(Utc::now());
        self.export_state(&state, Instant::now());
    }

    /// The member's partitions were taken away; `lost` when it had no say in it.
    pub fn revoked(&self, lost: bool, now: Instant) {
        let mut state = self.state();
        state.assigned = None;
        state.unassigned_since.get_or_insert(now);
        state.assignment_lost = lost;
        state.last_rebalance = Some(Utc::now());
        self.export_state(&state, now);
    }

    /// Messages came back from the broker (a fetch succeeded).
    pub fn fetched(&self) {
        self.state().last_fetch = Some(Utc::now());
    }

    /// The consumer holds a batch its handler cannot store yet, or no longer does.
    pub fn waiting_on_handler(&self, waiting: bool) {
        self.state().waiting_on_handler = waiting;
    }

    /// Whether the current consumer has waited for an assignment longer than its patience:
    /// the bound, doubled with each recreation since the group last assigned it (up to
    /// [`MAX_PATIENCE_FACTOR`] times), so a broker that needs longer gets it.
    pub fn should_recreate(&self, now: Instant) -> bool {
        let state = self.state();
        let Some(since) = state.unassigned_since else {
            return false;
        };
        let patience = self.bound * 2u32.pow(state.attempts.min(3)).min(MAX_PATIENCE_FACTOR);
        now.saturating_duration_since(since.max(state.created)) > patience
    }

    /// The consumer is being closed and made again.
    pub fn recreating(&self) {
        let mut state = self.state();
        state.attempts += 1;
        state.recreations += 1;
    }

    /// The problem readiness names while the consumer has been without an assignment for
    /// longer than the bound: `"GROUP: no assignment for N s"`.
    pub fn problem(&self, now: Instant) -> Option<String> {
        let state = self.state();
        let unassigned = now.saturating_duration_since(state.unassigned_since?);
        (unassigned > self.bound).then(|| {
            format!(
                "{}: no assignment for {} s",
                self.group,
                unassigned.as_secs()
            )
        })
    }

    /// The consumer's state at `now`.
    pub fn report(&self, now: Instant) -> ConsumerReport {
        let problem = self.problem(now);
        let state = self.state();
        let unassigned = state
            .unassigned_since
            .map(|since| now.saturating_duration_since(since));
        ConsumerReport {
            state: match (&state.assigned, &problem) {
                (Some(_), _) => "assigned",
                (None, None) => "rebalancing",
                (None, Some(_)) => "stuck",
            },
            assigned_partitions: state.assigned.clone().unwrap_or_default(),
            unassigned_for_secs: unassigned.map(|d| d.as_secs()),
            assignment_lost: state.assignment_lost,
            last_rebalance_at: state.last_rebalance,
            last_fetch_at: state.last_fetch,
            recreations: state.recreations,
            waiting_on_handler: state.waiting_on_handler,
            problem,
        }
    }

    /// Exports the membership gauges of the group.
    pub fn export(&self, now: Instant) {
        self.export_state(&self.state(), now);
    }

    fn export_state(&self, state: &WatchState, now: Instant) {
        let group = self.group.clone();
        metrics::gauge!("herald_consumer_assigned_partitions", "group" => group.clone())
            .set(state.assigned.as_ref().map_or(0, Vec::len) as f64);
        let unassigned = state.unassigned_since.map_or(0.0, |since| {
            now.saturating_duration_since(since).as_secs_f64()
        });
        metrics::gauge!("herald_consumer_seconds_since_assignment", "group" => group)
            .set(unassigned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(30);

    fn watch(start: Instant) -> ConsumerWatch {
        ConsumerWatch::new("notif-payment", BOUND, start)
    }

    #[test]
    fn a_consumer_is_stuck_only_once_it_has_been_without_assignment_beyond_the_bound() {
        let t0 = Instant::now();
        let watch = watch(t0);
        assert_eq!(
            watch.report(t0 + Duration::from_secs(29)).state,
            "rebalancing"
        );
        assert!(watch.problem(t0 + Duration::from_secs(29)).is_none());

        let later = t0 + Duration::from_secs(45);
        assert_eq!(watch.report(later).state, "stuck");
        assert_eq!(
            watch.problem(later).as_deref(),
            Some("notif-payment: no assignment for 45 s")
        );
        assert!(watch.should_recreate(later));
    }

    #[test]
    fn an_empty_assignment_is_an_assignment() {
        let t0 = Instant::now();
        let watch = watch(t0);
        watch.assigned(Vec::new());
        let later = t0 + Duration::from_secs(300);
        assert_eq!(watch.report(later).state, "assigned");
        assert!(!watch.should_recreate(later));
    }

    #[test]
    fn a_lost_assignment_is_reported_and_healed_by_the_next_one() {
        let t0 = Instant::now();
        let watch = watch(t0);
        watch.assigned(vec!["t/0".into(), "t/1".into()]);
        watch.revoked(true, t0 + Duration::from_secs(10));

        let stuck = t0 + Duration::from_secs(41);
        let report = watch.report(stuck);
        assert_eq!(report.state, "stuck");
        assert!(report.assignment_lost);
        assert_eq!(report.unassigned_for_secs, Some(31));
        assert!(report.assigned_partitions.is_empty());

        watch.assigned(vec!["t/1".into()]);
        let report = watch.report(stuck);
        assert_eq!(report.state, "assigned");
        assert!(!report.assignment_lost);
        assert_eq!(report.assigned_partitions, vec!["t/1".to_owned()]);
        assert!(report.problem.is_none());
    }

    #[test]
    fn each_recreation_waits_longer_but_readiness_counts_from_the_loss() {
        let t0 = Instant::now();
        let watch = watch(t0);
        let first = t0 + Duration::from_secs(31);
        assert!(watch.should_recreate(first));
        watch.recreating();
        watch.created(first);
        // The second consumer gets twice the bound of its own.
        assert!(!watch.should_recreate(first + Duration::from_secs(59)));
        assert!(watch.should_recreate(first + Duration::from_secs(61)));
        // Readiness still counts from when the assignment went away.
        assert_eq!(
            watch.problem(first + Duration::from_secs(1)).as_deref(),
            Some("notif-payment: no assignment for 32 s")
        );
        assert_eq!(watch.report(first).recreations, 1);

        // Patience stops growing at eight times the bound.
        for _ in 0..10 {
            watch.recreating();
        }
        watch.created(first);
        assert!(watch.should_recreate(first + BOUND * 8 + Duration::from_secs(1)));
    }

    #[test]
    fn a_revocation_while_unassigned_keeps_the_first_loss_time() {
        let t0 = Instant::now();
        let watch = watch(t0);
        watch.revoked(false, t0 + Duration::from_secs(20));
        assert!(watch.problem(t0 + Duration::from_secs(31)).is_some());
    }
}
