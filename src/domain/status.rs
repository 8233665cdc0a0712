use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Where one delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeliveryStatus {
    /// Waiting for a dispatcher (now, or at `next_attempt_at`).
    Pending,
    /// Claimed by a dispatcher holding a lease.
    Processing,
    Success,
    Failed,
    /// Not sent on purpose: opted out, no address, channel not configured.
    Skipped,
}

impl DeliveryStatus {
    /// The database and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "PENDING",
            DeliveryStatus::Processing => "PROCESSING",
            DeliveryStatus::Success => "SUCCESS",
            DeliveryStatus::Failed => "FAILED",
            DeliveryStatus::Skipped => "SKIPPED",
        }
    }

    /// True once nothing more will happen to the delivery.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            DeliveryStatus::Success | DeliveryStatus::Failed | DeliveryStatus::Skipped
        )
    }

    /// The state as the delivery events tell it: a claim's PROCESSING is internal (DESIGN
    /// §1 lets it stay unpublished, issue 14), so a claimed delivery reads as PENDING.
    pub fn published(self) -> Self {
        match self {
            DeliveryStatus::Processing => DeliveryStatus::Pending,
            other => other,
        }
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeliveryStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            DeliveryStatus::Pending,
            DeliveryStatus::Processing,
            DeliveryStatus::Success,
            DeliveryStatus::Failed,
            DeliveryStatus::Skipped,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
        .ok_or_else(|| format!("unknown delivery status {s:?}"))
    }
}

/// What a provider says became of a message after accepting it (issue 15); kept beside the
/// delivery status, which it does not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReceiptStatus {
    /// It reached the phone, device or mailbox.
    Delivered,
    /// It did not reach the phone or device (the reason says why).
    Undelivered,
    /// The email bounced.
    Bounced,
}

impl ReceiptStatus {
    /// The database and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptStatus::Delivered => "DELIVERED",
            ReceiptStatus::Undelivered => "UNDELIVERED",
            ReceiptStatus::Bounced => "BOUNCED",
        }
    }
}

impl FromStr for ReceiptStatus {
    type Err = String;

    /// Takes any letter case (`delivered`, `Delivered`): providers write it either way.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            ReceiptStatus::Delivered,
            ReceiptStatus::Undelivered,
            ReceiptStatus::Bounced,
        ]
        .into_iter()
        .find(|r| r.as_str().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| {
            format!("unknown receipt status {s:?} (expected DELIVERED, UNDELIVERED or BOUNCED)")
        })
    }
}

/// A notification's overall status, derived from its deliveries whenever it is read
/// (DESIGN §3), never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NotificationStatus {
    /// Nothing has been attempted yet.
    Pending,
    /// Some deliveries are under way or done, others are not finished.
    Processing,
    /// Every delivery succeeded or was skipped on purpose.
    Completed,
    /// Some deliveries succeeded, some failed.
    PartiallyFailed,
    /// Deliveries failed and none succeeded.
    Failed,
}

impl NotificationStatus {
    /// Derives the overall status from the deliveries' statuses.
    pub fn derive(deliveries: impl IntoIterator<Item = DeliveryStatus>) -> Self {
        let (mut pending, mut processing, mut success, mut failed) = (0, 0, 0, 0);
        for status in deliveries {
            match status {
                DeliveryStatus::Pending => pending += 1,
                DeliveryStatus::Processing => processing += 1,
                DeliveryStatus::Success => success += 1,
                DeliveryStatus::Failed => failed += 1,
                DeliveryStatus::Skipped => {}
            }
        }
        match (pending + processing, success, failed) {
            (0, s, f) if f > 0 && s > 0 => NotificationStatus::PartiallyFailed,
            (0, _, f) if f > 0 => NotificationStatus::Failed,
            (0, _, _) => NotificationStatus::Completed,
            _ if processing > 0 || success + failed > 0 => NotificationStatus::Processing,
            _ => NotificationStatus::Pending,
        }
    }

    /// The overall status as the delivery events tell it ([`DeliveryStatus::published`]),
    /// which is what notification.status.events announces.
    pub fn published(deliveries: impl IntoIterator<Item = DeliveryStatus>) -> Self {
        Self::derive(deliveries.into_iter().map(DeliveryStatus::published))
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationStatus::Pending => "PENDING",
            NotificationStatus::Processing => "PROCESSING",
            NotificationStatus::Completed => "COMPLETED",
            NotificationStatus::PartiallyFailed => "PARTIALLY_FAILED",
            NotificationStatus::Failed => "FAILED",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{DeliveryStatus::*, NotificationStatus};

    #[test]
    fn the_published_status_counts_a_claimed_delivery_as_pending() {
        assert_eq!(
            NotificationStatus::published([Processing, Pending]),
            NotificationStatus::Pending
        );
        assert_eq!(
            NotificationStatus::published([Processing, Success]),
            NotificationStatus::Processing
        );
        assert_eq!(
            NotificationStatus::published([Failed, Success]),
            NotificationStatus::PartiallyFailed
        );
    }

    #[test]
    fn overall_status_follows_the_deliveries() {
        let cases = [
            (vec![Pending, Pending], NotificationStatus::Pending),
            (vec![Pending, Skipped], NotificationStatus::Pending),
            (vec![Processing, Pending], NotificationStatus::Processing),
            (vec![Success, Pending], NotificationStatus::Processing),
            (vec![Success, Skipped], NotificationStatus::Completed),
            (vec![Skipped], NotificationStatus::Completed),
            (vec![Success, Failed], NotificationStatus::PartiallyFailed),
            (vec![Failed, Skipped], NotificationStatus::Failed),
            (vec![Failed, Failed], NotificationStatus::Failed),
        ];
        for (deliveries, expected) in cases {
            assert_eq!(
                NotificationStatus::derive(deliveries.clone()),
                expected,
                "{deliveries:?}"
            );
        }
    }
}
