//! Herald's vocabulary as types. Untrusted input (Kafka messages, HTTP bodies) is parsed
//! into these once, at the edge; code past the edge never re-checks a value.

mod channel;
mod contact;
mod event;
mod status;

pub use channel::Channel;
pub use contact::{BirthYear, EmailAddress, Locale, PhoneNumber, Tag, Timezone};
pub use event::{Domain, Event, EventId, EventType, Recipient, UserId};
pub use status::{DeliveryStatus, NotificationStatus};
