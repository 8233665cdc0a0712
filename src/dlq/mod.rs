//! Dead letters: a consumer (group notif-dlq) stores every record of
//! notification.dlq.<domain> once, and the admin service lists, retries and discards them.

pub mod admin;
pub mod store;
