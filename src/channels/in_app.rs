//! IN_APP: a JSON message PUBLISHed on the Redis channel `{prefix}inapp:user:{userId}`
//! (`herald:inapp:user:{userId}` with the default prefix). The delivery row itself is the
//! inbox entry, so a client that was offline reads it from the history API.

use chrono::Utc;
use redis::aio::ConnectionManager;
use serde_json::json;

use super::{Content, Outgoing, Receipt, SendError, SendFuture, Sender};

/// Publishes in-app messages.
pub struct InAppSender {
    redis: ConnectionManager,
    key_prefix: String,
}

impl InAppSender {
    pub fn new(redis: ConnectionManager, key_prefix: String) -> Self {
        InAppSender { redis, key_prefix }
    }

    /// The pub/sub channel of a user's in-app messages.
    pub fn channel_of(key_prefix: &str, user_id: i64) -> String {
        format!("{}{user_id}", Self::channel_prefix(key_prefix))
    }

    /// What the name of every user's channel starts with.
    pub fn channel_prefix(key_prefix: &str) -> String {
        format!("{key_prefix}inapp:user:")
    }
}

impl Sender for InAppSender {
    fn send<'a>(&'a self, message: &'a Outgoing) -> SendFuture<'a> {
        Box::pin(async move {
            let Content::Short(content) = &message.content else {
                return Err(SendError::permanent(
                    "template",
                    "IN_APP needs a title and text",
                ));
            };
            let Some(user_id) = message.user_id else {
                return Err(SendError::permanent("address", "IN_APP needs a userId"));
            };
            let payload = json!({
                "deliveryId": message.delivery_id,
                "notificationId": message.notification_id,
                "userId": user_id,
                "eventType": message.event_type,
                "title": content.title,
                "body": content.body,
                "sentAt": Utc::now(),
            });
            let mut conn = self.redis.clone();
            let receivers: i64 = redis::cmd("PUBLISH")
                .arg(Self::channel_of(&self.key_prefix, user_id))
                .arg(payload.to_string())
                .query_async(&mut conn)
                .await
                .map_err(|e| SendError::retryable("redis", format!("Redis PUBLISH failed: {e}")))?;
            Ok(Receipt {
                provider_ref: Some(format!("subscribers:{receivers}")),
            })
        })
    }
}
