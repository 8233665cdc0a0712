//! Frequency caps: at most N sends to one user on one channel (optionally of one event
//! type) in a sliding window, shared by every Herald instance through Redis (issue 18).
//!
//! The same sliding-window log as the channels' rate limits ([`crate::dispatch::rate_limit`]),
//! one sorted set per user, channel and event type, keyed by the delivery: a delivery
//! counted once is never counted again (its retries, a reclaim after a crash), and one
//! Lua script checks every cap that applies before it counts the send in any, so a send
//! refused by one cap does not use up another. The keys of one user share a hash tag, so
//! the script runs on Redis Cluster too.
//!
//! **Failing open.** When Redis cannot answer within [`TIMEOUT`], the send goes out
//! uncounted (`herald_frequency_cap_unavailable_total` counts it, and a warning is logged):
//! a cap spares users noise, and Herald does not hold back or drop their notifications
//! because a cache is down. The rate limits decide the same way.

use std::time::Duration;

use redis::{Script, aio::ConnectionManager};
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::{Channel, EventType, UserId};

/// How long the cap check may take before the send goes out uncounted.
pub const TIMEOUT: Duration = Duration::from_millis(500);

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local wait = 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[i * 2])
  local window = tonumber(ARGV[i * 2 + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if not redis.call('ZSCORE', key, member) and redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    wait = math.max(wait, tonumber(oldest[2]) + window - now + 1)
  end
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  if not redis.call('ZSCORE', key, member) then
    redis.call('ZADD', key, now, member)
  end
  redis.call('PEXPIRE', key, tonumber(ARGV[i * 2 + 1]))
end
return 0
"#;

/// One cap of the routing file (`[[frequency_cap]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrequencyCap {
    pub channel: Channel,
    /// Counts only this event type's sends; absent, every event type's.
    #[serde(default)]
    pub event_type: Option<EventType>,
    /// At most this many sends...
    pub limit: u32,
    /// ...in any window of this many minutes.
    pub per_minutes: u32,
}

impl FrequencyCap {
    /// Checks what serde cannot.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.limit >= 1 && self.per_minutes >= 1,
            "a frequency cap on {} needs a limit and per_minutes of at least 1",
            self.channel
        );
        Ok(())
    }

    fn applies(&self, channel: Channel, event_type: &EventType) -> bool {
        self.channel == channel && self.event_type.as_ref().is_none_or(|t| t == event_type)
    }

    fn window(&self) -> Duration {
        Duration::from_secs(u64::from(self.per_minutes) * 60)
    }
}

/// What the caps say about one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead (and it is counted).
    Send,
    /// Over a cap: there is room again after this long.
    Capped(Duration),
}

/// The caps, and where they are counted.
#[derive(Clone)]
pub struct FrequencyCaps {
    caps: Vec<FrequencyCap>,
    redis: ConnectionManager,
    key_prefix: String,
    script: Script,
}

impl FrequencyCaps {
    pub fn new(caps: Vec<FrequencyCap>, redis: ConnectionManager, key_prefix: String) -> Self {
        FrequencyCaps {
            caps,
            redis,
            key_prefix,
            script: Script::new(SCRIPT),
        }
    }

    /// Whether any cap counts sends of `channel`.
    pub fn covers(&self, channel: Channel) -> bool {
        self.caps.iter().any(|c| c.channel == channel)
    }

    /// Checks and counts one send of `delivery` to `user`.
    pub async fn check(
        &self,
        user: UserId,
        channel: Channel,
        event_type: &EventType,
        delivery: Uuid,
    ) -> Verdict {
        let caps: Vec<&FrequencyCap> = self
            .caps
            .iter()
            .filter(|c| c.applies(channel, event_type))
            .collect();
        if caps.is_empty() {
            return Verdict::Send;
        }
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(delivery.to_string());
        for cap in &caps {
            let scope = cap.event_type.as_ref().map_or("*", EventType::as_str);
            invocation
                .key(format!(
                    "{}fcap:{{{user}}}:{channel}:{scope}:{}:{}",
                    self.key_prefix, cap.limit, cap.per_minutes
                ))
                .arg(cap.limit)
                .arg(cap.window().as_millis() as u64);
        }
        let mut conn = self.redis.clone();
        let answer = tokio::time::timeout(TIMEOUT, invocation.invoke_async::<u64>(&mut conn)).await;
        match answer {
            Ok(Ok(0)) => Verdict::Send,
            Ok(Ok(wait_ms)) => Verdict::Capped(Duration::from_millis(wait_ms)),
            Ok(Err(error)) => fail_open(channel, &error.to_string()),
            Err(_) => fail_open(channel, "no answer in time"),
        }
    }
}

fn fail_open(channel: Channel, reason: &str) -> Verdict {
    metrics::counter!("herald_frequency_cap_unavailable_total", "channel" => channel.as_str())
        .increment(1);
    tracing::warn!(%channel, %reason, "frequency caps unavailable; sending uncounted");
    Verdict::Send
}
