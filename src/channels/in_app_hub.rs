//! The in-app stream hub: one Redis pub/sub connection per instance, shared by every open
//! `GET /api/v1/users/{id}/inbox/stream`.
//!
//! Why: a connection per stream let a few thousand open streams exhaust Redis's clients,
//! and then everything else that needs Redis (the shared rate limiter above all, which then
//! fails open) lost it too. Here a user with streams on this instance costs one SUBSCRIBE on
//! the shared connection and one tokio broadcast channel that fans their messages out in
//! memory; the last of their streams to close unsubscribes. Streams are capped per user and
//! per instance.
//!
//! The connection is opened on the first stream and re-opened with backoff when lost. When
//! it is lost every open stream ends, as a stream on its own connection did: clients
//! reconnect and catch up from the inbox, instead of silently missing what was published
//! meanwhile. A client too slow to keep up with its user's messages is ended the same way.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Once},
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use redis::aio::PubSubSink;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::in_app::InAppSender;

/// Messages one user's slowest stream may fall behind before it is ended.
const USER_BUFFER: usize = 64;
/// How long opening a stream waits for Redis to confirm its subscription.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);
/// Bounds one Redis round trip of the hub (connect, SUBSCRIBE, PING).
const REDIS_WAIT: Duration = Duration::from_secs(5);
/// How often an idle connection is checked, so a silently dead one is noticed.
const PING_EVERY: Duration = Duration::from_secs(30);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user holds as many streams on this instance as one user may.
    UserFull,
    /// This instance holds as many streams as it may.
    InstanceFull,
    /// Redis did not confirm the subscription in time.
    Unavailable,
}

/// The shared subscription of one instance. Cheap to clone.
#[derive(Clone)]
pub struct StreamHub {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    /// `{prefix}inapp:user:`, followed by the user id in each channel's name.
    channel_prefix: String,
    per_user: usize,
    per_instance: usize,
    shutdown: CancellationToken,
    streams: Mutex<Streams>,
    /// Subscription changes for the connection task, in the order the map changed.
    commands: mpsc::UnboundedSender<Command>,
    /// Taken by the connection task when the first stream opens.
    queued: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
    started: Once,
}

/// The open streams, by user.
#[derive(Default)]
struct Streams {
    users: HashMap<i64, UserStreams>,
    open: usize,
}

struct UserStreams {
    /// Replaced (ending every stream of the old one) when the connection is lost.
    sender: broadcast::Sender<Arc<str>>,
    count: usize,
    /// True once Redis confirmed the user's SUBSCRIBE on the current connection.
    subscribed: watch::Sender<bool>,
}

enum Command {
    Subscribe(i64),
    Unsubscribe(i64),
}

/// One open stream's place in the hub; gives it back when dropped.
pub struct Subscription {
    receiver: broadcast::Receiver<Arc<str>>,
    _slot: Slot,
}

struct Slot {
    inner: Arc<Inner>,
    user: i64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inner.release(self.user);
    }
}

impl StreamHub {
    /// A hub that connects on its first stream and stops when `shutdown` is cancelled.
    pub fn new(
        client: redis::Client,
        key_prefix: String,
        per_user: usize,
        per_instance: usize,
        shutdown: CancellationToken,
    ) -> Self {
        let (commands, queued) = mpsc::unbounded_channel();
        StreamHub {
            inner: Arc::new(Inner {
                client,
                channel_prefix: InAppSender::channel_prefix(&key_prefix),
                per_user,
                per_instance,
                shutdown,
                streams: Mutex::new(Streams::default()),
                commands,
                queued: Mutex::new(Some(queued)),
                started: Once::new(),
            }),
        }
    }

    /// Opens a stream of `user`'s in-app messages; it receives what is published after this
    /// returns.
    pub async fn subscribe(&self, user: i64) -> Result<Subscription, Refusal> {
        self.start();
        let (mut subscribed, slot) = {
            let mut streams = self.inner.lock();
            let count = streams.users.get(&user).map_or(0, |u| u.count);
            if count >= self.inner.per_user {
                return Err(Refusal::UserFull);
            }
            if streams.open >= self.inner.per_instance {
                return Err(Refusal::InstanceFull);
            }
            let entry = streams.users.entry(user).or_insert_with(|| {
                // Sent while the map is locked, so commands reach the connection in the
                // order the map changed (an unsubscribe never overtakes a later subscribe).
                let _ = self.inner.commands.send(Command::Subscribe(user));
                UserStreams {
                    sender: broadcast::channel(USER_BUFFER).0,
                    count: 0,
                    subscribed: watch::channel(false).0,
                }
            });
            entry.count += 1;
            let subscribed = entry.subscribed.subscribe();
            streams.open += 1;
            metrics::gauge!("herald_inapp_streams").set(streams.open as f64);
            let slot = Slot {
                inner: self.inner.clone(),
                user,
            };
            (subscribed, slot)
        };
        let confirmed = tokio::time::timeout(SUBSCRIBE_WAIT, subscribed.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok());
        if !confirmed {
            return Err(Refusal::Unavailable);
        }
        // Taken now, not before the wait: a connection lost meanwhile replaced the sender.
        let receiver = self
            .inner
            .lock()
            .users
            .get(&user)
            .expect("a user with an open slot has an entry")
            .sender
            .subscribe();
        Ok(Subscription {
            receiver,
            _slot: slot,
        })
    }

    fn start(&self) {
        self.inner.started.call_once(|| {
            let queued = self
                .inner
                .queued
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .expect("the connection task starts once");
            tokio::spawn(run(self.inner.clone(), queued));
        });
    }
}

impl Subscription {
    /// The messages (the JSON the publisher sent). Ends when the hub loses Redis, when this
    /// stream fell too far behind, or when the instance shuts down.
    pub fn into_stream(self) -> impl Stream<Item = Arc<str>> + Send + 'static {
        futures_util::stream::unfold(self, |mut this| async move {
            match this.receiver.recv().await {
                Ok(message) => Some((message, this)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!("herald_inapp_streams_lagged_total").increment(1);
                    tracing::debug!(missed, "an in-app stream fell behind; ending it");
                    None
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn channel(&self, user: i64) -> String {
        format!("{}{user}", self.channel_prefix)
    }

    fn release(&self, user: i64) {
        let mut streams = self.lock();
        streams.open -= 1;
        metrics::gauge!("herald_inapp_streams").set(streams.open as f64);
        let Some(entry) = streams.users.get_mut(&user) else {
            return;
        };
        entry.count -= 1;
        if entry.count == 0 {
            streams.users.remove(&user);
            let _ = self.commands.send(Command::Unsubscribe(user));
        }
    }

    fn mark_subscribed(&self, users: &[i64]) {
        let streams = self.lock();
        for user in users {
            if let Some(entry) = streams.users.get(user) {
                entry.subscribed.send_replace(true);
            }
        }
    }

    /// Relays one published message to the streams of its user.
    fn deliver(&self, message: &redis::Msg) {
        let name = message.get_channel_name();
        let Some(user) = name
            .strip_prefix(self.channel_prefix.as_str())
            .and_then(|id| id.parse::<i64>().ok())
        else {
            return;
        };
        let Ok(payload) = message.get_payload::<String>() else {
            return;
        };
        if let Some(entry) = self.lock().users.get(&user) {
            // No receiver left is fine: the last stream is closing.
            let _ = entry.sender.send(payload.into());
        }
    }

    /// The connection is gone: end every open stream (their clients reconnect and catch up
    /// from the inbox) and wait for the next connection's confirmation.
    fn end_streams(&self) {
        let mut streams = self.lock();
        for entry in streams.users.values_mut() {
            entry.sender = broadcast::channel(USER_BUFFER).0;
            entry.subscribed.send_replace(false);
        }
    }
}

/// The connection task: (re)connects, keeps the SUBSCRIBEs in step with the open streams,
/// and relays messages, until shutdown.
async fn run(inner: Arc<Inner>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let connected = tokio::select! {
            () = inner.shutdown.cancelled() => return,
            connected = tokio::time::timeout(REDIS_WAIT, inner.client.get_async_pubsub()) => connected,
        };
        let error = match connected {
            Ok(Ok(pubsub)) => {
                let (mut sink, mut messages) = pubsub.split();
                // Commands are sent under the map's lock, so the snapshot below already
                // reflects every command queued before it: drop those (while Redis was
                // away they pile up with every refused stream). Later ones are applied
                // after it; SUBSCRIBE and UNSUBSCRIBE are idempotent and keep the map's order.
                while commands.try_recv().is_ok() {}
                let users: Vec<i64> = inner.lock().users.keys().copied().collect();
                match subscribe(&inner, &mut sink, &users).await {
                    Ok(()) => {
                        backoff = BACKOFF_FIRST;
                        tracing::info!(users = users.len(), "in-app stream hub connected");
                        tokio::select! {
                            () = inner.shutdown.cancelled() => return,
                            error = relay(&inner, &mut sink, &mut messages, &mut commands) => error,
                        }
                    }
                    Err(error) => error,
                }
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => "no answer in time".to_owned(),
        };
        inner.end_streams();
        metrics::counter!("herald_inapp_hub_reconnects_total").increment(1);
        tracing::warn!(%error, retry_in = ?backoff, "in-app stream hub lost Redis; reconnecting");
        tokio::select! {
            () = inner.shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// SUBSCRIBEs `users` on the current connection and lets their streams start.
async fn subscribe(inner: &Inner, sink: &mut PubSubSink, users: &[i64]) -> Result<(), String> {
    if users.is_empty() {
        return Ok(());
    }
    let channels: Vec<String> = users.iter().map(|u| inner.channel(*u)).collect();
    match tokio::time::timeout(REDIS_WAIT, sink.subscribe(channels)).await {
        Ok(Ok(())) => {
            inner.mark_subscribed(users);
            Ok(())
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("SUBSCRIBE got no answer in time".to_owned()),
    }
}

/// Relays messages and applies subscription changes until the connection fails; returns why.
async fn relay(
    inner: &Inner,
    sink: &mut PubSubSink,
    messages: &mut redis::aio::PubSubStream,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> String {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some(message) => inner.deliver(&message),
                None => return "the connection closed".to_owned(),
            },
            command = commands.recv() => {
                let result = match command {
                    Some(Command::Subscribe(user)) => subscribe(inner, sink, &[user]).await,
                    Some(Command::Unsubscribe(user)) => {
                        match tokio::time::timeout(REDIS_WAIT, sink.unsubscribe(inner.channel(user))).await {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(error)) => Err(error.to_string()),
                            Err(_) => Err("UNSUBSCRIBE got no answer in time".to_owned()),
                        }
                    }
                    // Cannot happen while this task holds the hub, which holds the sender.
                    None => return "the hub closed".to_owned(),
                };
                if let Err(error) = result {
                    return error;
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(REDIS_WAIT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return error.to_string(),
                    Err(_) => return "PING got no answer in time".to_owned(),
                }
            }
        }
    }
}
