//! Dead letters: a consumer (group notif-dlq) stores every record of
//! notification.dlq.<domain> once, and operators find, count, correct, retry, replay (by
//! filter, rate-capped, in the background) and discard them.

pub mod admin;
pub mod edit;
pub mod replay;
pub mod store;
