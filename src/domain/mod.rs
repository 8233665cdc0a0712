//! Herald's vocabulary as types. Untrusted input (Kafka messages, HTTP bodies) is parsed
//! into these once, at the edge; code past the edge never re-checks a value.

mod channel;
mod contact;
mod event;
mod status;

pub use channel::Channel;
pub use contact::{BirthYear, EmailAddress, Locale, PhoneNumber, Tag, Timezone};
pub use event::{Domain, Event, EventId, EventType, Recipient, UserId};
pub use status::{DeliveryStatus, NotificationStatus, ReceiptStatus};

/// Stores an enumeration as its TEXT name (`as_str`) and reads it back through `FromStr`,
/// so that a row decodes into the enum or fails loudly with the value it held, instead of
/// travelling as a `String` and falling back to a default somewhere later. TEXT with CHECK
/// constraints rather than PostgreSQL enums (migration 0001 says why).
macro_rules! text_column {
    ($($name:ident),+) => {$(
        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $name {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                text.parse::<$name>().map_err(|error| {
                    format!(concat!("a ", stringify!($name), " column held {:?}: {}"), text, error)
                        .into()
                })
            }
        }
    )+};
}

text_column!(Channel, DeliveryStatus, Domain, Locale, ReceiptStatus);
