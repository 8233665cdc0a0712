//! Per-channel send limits shared by every Herald instance through Redis.
//!
//! A sliding-window log rather than a plain token bucket: a bucket of N tokens refilled at
//! N per window lets up to 2N sends through in one window (a full bucket, then the refill),
//! while providers state their limits as "N per window". The log keeps the start time of
//! the sends of the last window in a sorted set and admits a send only while fewer than N
//! are in it, so no window of that length ever sees more than N. One Lua script makes the
//! check-and-add atomic across instances, with Redis' own clock.

use std::time::Duration;

use redis::{Script, aio::ConnectionManager};

use crate::{config::RateLimit, domain::Channel};

/// Kept on top of the window, so that sends admitted just inside it cannot reach the
/// provider inside one window of its clock because one of them was slower on the way
/// (a loaded host, a GC pause at the provider). Negligible against minute-long windows.
const GUARD: Duration = Duration::from_millis(250);

const SCRIPT: &str = r#"
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local member = ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, window)
  return 0
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now + 1)
"#;

const PEEK: &str = r#"
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local used = redis.call('ZCARD', key)
if used < limit then return {limit - used, 0} end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, math.max(1, tonumber(oldest[2]) + window - now + 1)}
"#;

/// What the limiter says about one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Admitted,
    /// Try again after this long.
    Wait(Duration),
}

/// The shared limiter.
#[derive(Clone)]
pub struct RateLimiter {
    redis: ConnectionManager,
    key_prefix: String,
    script: Script,
    peek: Script,
}

impl RateLimiter {
    pub fn new(redis: ConnectionManager, key_prefix: String) -> Self {
        RateLimiter {
            redis,
            key_prefix,
            script: Script::new(SCRIPT),
            peek: Script::new(PEEK),
        }
    }

    /// How many sends the window has room for now, and if none, how long until it has:
    /// lets the dispatcher claim only what it can send instead of claiming and deferring.
    /// `None` when Redis cannot answer (the per-send check then decides, failing open).
    pub async fn room(&self, channel: Channel, limit: RateLimit) -> Option<(u32, Duration)> {
        let mut conn = self.redis.clone();
        let answer = tokio::time::timeout(
            Duration::from_millis(500),
            self.peek
                .key(format!("{}ratelimit:{channel}", self.key_prefix))
                .arg(limit.limit)
                .arg((limit.window + GUARD).as_millis() as u64)
                .invoke_async::<(u32, u64)>(&mut conn),
        )
        .await;
        match answer {
            Ok(Ok((free, wait_ms))) => Some((free, Duration::from_millis(wait_ms))),
            _ => None,
        }
    }

    /// Takes a slot for one send on `channel` under `limit`. `token` must be unique per
    /// send. If Redis cannot answer, the send is admitted (fail open: a notification is
    /// not held back by a cache outage) and the event is counted.
    pub async fn admit(&self, channel: Channel, limit: RateLimit, token: &str) -> Admission {
        let window = limit.window + GUARD;
        let mut conn = self.redis.clone();
        let answer = tokio::time::timeout(
            Duration::from_millis(500),
            self.script
                .key(format!("{}ratelimit:{channel}", self.key_prefix))
                .arg(limit.limit)
                .arg(window.as_millis() as u64)
                .arg(token)
                .invoke_async::<u64>(&mut conn),
        )
        .await;
        match answer {
            Ok(Ok(0)) => Admission::Admitted,
            Ok(Ok(wait_ms)) => Admission::Wait(Duration::from_millis(wait_ms)),
            Ok(Err(error)) => fail_open(channel, &error.to_string()),
            Err(_) => fail_open(channel, "no answer in time"),
        }
    }
}

fn fail_open(channel: Channel, reason: &str) -> Admission {
    metrics::counter!("herald_rate_limit_unavailable_total", "channel" => channel.as_str())
        .increment(1);
    tracing::warn!(%channel, %reason, "rate limiter unavailable; admitting the send");
    Admission::Admitted
}
