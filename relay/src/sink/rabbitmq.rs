//! RabbitMQ sink: persistent, `mandatory` publishes with publisher confirms (lapin).
//!
//! An event counts as [`Outcome::Delivered`] only when RabbitMQ acked it **and**
//! did not return it as unroutable. Every publish runs alone on a pooled channel
//! in confirm mode, so a returned message, a nack or a channel error always
//! belongs to the one event on that channel:
//!
//! - lapin hands a `basic.return` to whichever confirm on the channel resolves
//!   next (`Confirmation::Ack(Some(returned))`), and resolves a multiple-ack in
//!   hash-map order; with many publishes in flight on one channel a returned
//!   event could be reported on another event's confirm and its own ack would
//!   look clean, which would lose it.
//! - RabbitMQ answers a publish to a missing exchange by closing the channel
//!   (404); on a shared channel that would fail every other publish in flight.
//!
//! Concurrency comes from many channels on one connection (at most
//! [`MAX_CHANNELS`]); a channel goes back to the pool only after a clean answer,
//! and a broken connection is replaced by the first publish that needs it.
//!
//! One event must never take the connection down for every other key. RabbitMQ
//! closes the whole connection (501 FRAME_ERROR) when a message's properties and
//! headers do not fit into one frame (`frame_max`, 128 KiB by default), and
//! refuses bodies over its `max_message_size`; both are checked before the
//! publish and are [permanent](SinkError::permanent) rejections of that event. If
//! the broker still closes the connection with an error about what the client
//! sent, every event that was being published then becomes a suspect: it is
//! published again *alone*, and a suspect that takes the connection down alone
//! is rejected permanently, so neither the breaker's probe nor the retries
//! repeat it forever.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind};
use outbox_core::EventId;
use tokio::sync::{Mutex, RwLock, Semaphore};

use crate::event::{OutboxEvent, wire};
use crate::route::Route;
use crate::sink::{Outcome, Sink, SinkError};

/// Most channels the sink opens on its connection; each carries one publish at a time,
/// so this bounds the publishes in flight to RabbitMQ (further callers wait for a channel).
pub const MAX_CHANNELS: usize = 256;

/// Writer header whose value becomes the message's `correlation_id`.
pub const CORRELATION_ID_HEADER: &str = "correlation-id";

/// AMQP short strings (exchange, routing key, header names, most properties) hold at most this many bytes.
const MAX_SHORT_STRING_BYTES: usize = 255;

/// Reply code and text of a graceful close.
const REPLY_SUCCESS: u16 = 200;

/// Default largest message body, in bytes: RabbitMQ 4's default `max_message_size` (16 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of a content header frame besides the properties: frame type, channel and
/// size (7), class id, weight and body size (12), property flags (2), frame end (1).
const HEADER_FRAME_OVERHEAD_BYTES: usize = 22;

/// Suspects remembered at most; beyond that the set is cleared (they are retried normally).
const MAX_SUSPECTS: usize = 10_000;

/// How the RabbitMQ sink connects and publishes.
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitMqConfig {
    /// `amqp://user:password@host:5672/vhost` (or `amqps://`); the password is never logged.
    pub url: String,
    /// The `app_id` property of every message, e.g. `outbox-relay`; the connection is
    /// named `outbox-relay <app_id>` in the broker's management UI.
    pub app_id: String,
    /// Bound on connecting, including the exchange declarations; also bounds each reconnect.
    pub connect_timeout: Duration,
    /// Bound on one publish, from taking a channel to the broker's confirm.
    pub publish_timeout: Duration,
    /// Exchanges declared on every (re)connect.
    pub declare_exchanges: Vec<ExchangeDeclaration>,
    /// PEM file of the CA(s) that signed the broker's certificate, for `amqps://`
    /// (`None`: the system's trust store). The broker's host name is always verified.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Largest message body (the payload) sent, in bytes; larger events are rejected
    /// permanently before the publish. Set it to the broker's `max_message_size`
    /// (default [`DEFAULT_MAX_MESSAGE_BYTES`]).
    pub max_message_bytes: usize,
}

impl fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("url", &mask_url(&self.url))
            .field("app_id", &self.app_id)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("declare_exchanges", &self.declare_exchanges)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

/// An exchange the sink declares when it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeDeclaration {
    /// Exchange name.
    pub name: String,
    /// Routing algorithm.
    pub kind: ExchangeKind,
    /// Whether the exchange survives a broker restart.
    pub durable: bool,
}

/// The routing algorithm of a declared exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Routing key equals the binding key.
    Direct,
    /// Routing key matches a binding pattern with `*` and `#`.
    Topic,
    /// Every bound queue, regardless of the routing key.
    Fanout,
    /// Message headers match the binding arguments.
    Headers,
}

impl ExchangeKind {
    fn as_lapin(self) -> lapin::ExchangeKind {
        match self {
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// Publishes events to RabbitMQ exchanges with publisher confirms; see the [module docs](self).
pub struct RabbitMqSink {
    config: RabbitMqConfig,
    uri: AMQPUri,
    /// The url with the password masked, for messages and logs.
    shown_url: String,
    app_id: ShortString,
    connection: Mutex<ConnectionSlot>,
    /// Generation of the connection in `connection`; channels of older ones are stale.
    generation: AtomicU64,
    idle: StdMutex<Vec<PooledChannel>>,
    channels: Semaphore,
    closed: AtomicBool,
    /// The negotiated `frame_max` of the current connection, in bytes.
    frame_max: AtomicU32,
    /// Events that were being published when RabbitMQ closed the connection for
    /// something the client sent; each is published again alone.
    suspects: StdMutex<HashSet<EventId>>,
    /// Ordinary publishes share it; a suspect's publish takes it alone.
    isolation: RwLock<()>,
}

impl fmt::Debug for RabbitMqSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqSink")
            .field("url", &self.shown_url)
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct ConnectionSlot {
    live: Option<Live>,
    /// The last failed (re)connect; callers that waited for it share its error instead of trying again at once.
    last_failure: Option<(Instant, SinkError)>,
}

struct Live {
    connection: Arc<Connection>,
    generation: u64,
}

struct PooledChannel {
    channel: Channel,
    generation: u64,
}

/// What goes on the wire for one event.
struct Publication {
    exchange: ShortString,
    routing_key: ShortString,
    message_id: String,
    properties: BasicProperties,
}

impl RabbitMqSink {
    /// Connect, declare the configured exchanges and check that publishing can start.
    ///
    /// Errors name the problem and what to check; the url's password is masked in
    /// them. Errors of the configuration itself are [permanent](SinkError::is_permanent):
    /// retrying cannot help; others (broker down, login refused) may pass.
    pub async fn connect(config: RabbitMqConfig) -> Result<Self, SinkError> {
        let shown_url = mask_url(&config.url);
        let uri = parse_url(&config.url, &shown_url)?;
        let app_id = ShortString::try_new(config.app_id.clone()).map_err(|_| {
            SinkError::permanent(format!(
                "app_id is {} bytes; RabbitMQ allows at most {MAX_SHORT_STRING_BYTES}: shorten it",
                config.app_id.len()
            ))
        })?;
        for declaration in &config.declare_exchanges {
            check_short("exchange name in declare_exchanges", &declaration.name)?;
            if declaration.name.is_empty() {
                return Err(SinkError::permanent(
                    "declare_exchanges has an exchange with an empty name; the default exchange \
                     cannot be declared: remove it or give it a name",
                ));
            }
        }
        let connection = open(&uri, &config, &shown_url)
            .await
            .map_err(|reason| SinkError::new(format!("cannot connect to RabbitMQ at {reason}")))?;
        // One channel number stays free for the declarations on a reconnect.
        let negotiated = usize::from(connection.configuration().channel_max()).saturating_sub(1);
        let channels = MAX_CHANNELS.min(negotiated).max(1);
        let first = tokio::time::timeout(config.connect_timeout, confirm_channel(&connection))
            .await
            .map_err(|_| format!("no channel within {:?}", config.connect_timeout))
            .and_then(|opened| {
                opened.map_err(|e| {
                    scrub(
                        &e.to_string(),
                        &config.url,
                        &uri.authority.userinfo.password,
                    )
                })
            })
            .map_err(|reason| {
                SinkError::new(format!(
                    "connected to RabbitMQ at {shown_url} but cannot open a channel in \
                     publisher-confirm mode: {reason}; check the broker log"
                ))
            })?;
        let frame_max = connection.configuration().frame_max();
        tracing::info!(url = %shown_url, channels, frame_max, "connected to RabbitMQ");
        Ok(RabbitMqSink {
            frame_max: AtomicU32::new(frame_max),
            suspects: StdMutex::new(HashSet::new()),
            isolation: RwLock::new(()),
            config,
            uri,
            shown_url,
            app_id,
            connection: Mutex::new(ConnectionSlot {
                live: Some(Live {
                    connection: Arc::new(connection),
                    generation: 1,
                }),
                last_failure: None,
            }),
            generation: AtomicU64::new(1),
            idle: StdMutex::new(vec![PooledChannel {
                channel: first,
                generation: 1,
            }]),
            channels: Semaphore::new(channels),
            closed: AtomicBool::new(false),
        })
    }

    /// The configuration this sink was built with.
    pub fn config(&self) -> &RabbitMqConfig {
        &self.config
    }

    /// Publish on a pooled channel; `client_fault` is set to the broker's reply when
    /// it closed the connection for something the client sent.
    async fn publish_on_a_channel(
        &self,
        publication: Publication,
        payload: &[u8],
        route: &Route,
        client_fault: &mut Option<String>,
    ) -> Outcome {
        let Ok(_permit) = self.channels.acquire().await else {
            return Outcome::Retry(self.closed_error());
        };
        let pooled = match self.take_channel().await {
            Ok(pooled) => pooled,
            Err(error) => return Outcome::Retry(error),
        };
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let published = pooled
            .channel
            .basic_publish(
                publication.exchange,
                publication.routing_key,
                options,
                payload,
                publication.properties,
            )
            .await;
        let confirm = match published {
            Ok(confirm) => confirm,
            // The channel is dropped (closed) here; the next publish takes a fresh one.
            Err(error) => {
                *client_fault = closed_for_what_the_client_sent(&error);
                return self.failed(&error, route);
            }
        };
        match confirm.await {
            Ok(Confirmation::Ack(None)) => {
                self.put_back(pooled);
                Outcome::Delivered
            }
            Ok(Confirmation::Ack(Some(returned))) => {
                let returned_id = returned
                    .properties
                    .message_id()
                    .as_ref()
                    .map(ShortString::as_str);
                if returned_id == Some(publication.message_id.as_str()) {
                    self.put_back(pooled);
                    Outcome::Rejected(SinkError::new(format!(
                        "unroutable: exchange '{}' has no queue bound for routing key '{}' \
                         (RabbitMQ returned it: {} {}); bind a queue or fix the route",
                        route.destination, route.key, returned.reply_code, returned.reply_text
                    )))
                } else {
                    // Cannot happen with one publish per channel; if it does, this ack proves nothing.
                    tracing::warn!(
                        exchange = %route.destination,
                        returned_message_id = ?returned_id,
                        "RabbitMQ returned a message on a channel that carried another one; discarding the channel"
                    );
                    Outcome::Retry(SinkError::new(format!(
                        "the confirm for exchange '{}' came with another message's return \
                         ({} {}); the channel was discarded and the event will be published again",
                        route.destination, returned.reply_code, returned.reply_text
                    )))
                }
            }
            Ok(Confirmation::Nack(_)) => {
                self.put_back(pooled);
                Outcome::Retry(SinkError::new(format!(
                    "RabbitMQ nacked the message for exchange '{}' (it could not take it now, e.g. \
                     a queue at its length limit with overflow=reject-publish or an internal error); \
                     it will be published again",
                    route.destination
                )))
            }
            Ok(Confirmation::NotRequested) => Outcome::Retry(SinkError::new(
                "the channel was not in publisher-confirm mode, so RabbitMQ did not confirm the \
                 message; the channel was discarded and the event will be published again",
            )),
            Err(error) => {
                *client_fault = closed_for_what_the_client_sent(&error);
                self.failed(&error, route)
            }
        }
    }

    /// The outcome of a publish that lapin reported as an error.
    fn failed(&self, error: &lapin::Error, route: &Route) -> Outcome {
        let exchange = &route.destination;
        let ErrorKind::ProtocolError(amqp) = error.kind() else {
            return Outcome::Retry(SinkError::new(format!(
                "publishing to exchange '{exchange}' failed: {}; the next publish reopens the \
                 channel and, if needed, the connection to RabbitMQ at {}",
                self.scrub(&error.to_string()),
                self.shown_url
            )));
        };
        let reply = reply(amqp);
        let (rejected, message) = match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => (
                true,
                format!(
                    "exchange '{exchange}' does not exist (RabbitMQ closed the channel: {reply}); \
                     declare it (declare_exchanges) or fix the route"
                ),
            ),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => (
                true,
                format!(
                    "RabbitMQ refused the publish to exchange '{exchange}' ({reply}); grant the \
                     user in the url write permission on it, or fix the route"
                ),
            ),
            AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => {
                return Outcome::Rejected(SinkError::permanent(format!(
                    "RabbitMQ refused the message for exchange '{exchange}' as too large ({reply}); \
                     send a reference to the data instead, or raise the broker's max_message_size \
                     and rabbitmq.max_message_bytes"
                )));
            }
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => (
                true,
                format!(
                    "RabbitMQ refused the message for exchange '{exchange}' ({reply}); a message \
                     larger than the broker's max_message_size is the usual cause"
                ),
            ),
            // The channel carried only this publish: its close is this event's rejection.
            AMQPErrorKind::Soft(_) => (
                true,
                format!(
                    "RabbitMQ closed the channel that carried only this event, publishing to \
                     exchange '{exchange}' ({reply}); check the event and the broker log"
                ),
            ),
            AMQPErrorKind::Hard(_) => (
                false,
                format!(
                    "RabbitMQ at {} closed the connection while publishing to exchange \
                     '{exchange}' ({reply}); the next publish reconnects",
                    self.shown_url
                ),
            ),
        };
        if rejected {
            Outcome::Rejected(SinkError::new(message))
        } else {
            Outcome::Retry(SinkError::new(message))
        }
    }

    /// A library's message without the url's password.
    fn scrub(&self, text: &str) -> String {
        scrub(
            text,
            &self.config.url,
            &self.uri.authority.userinfo.password,
        )
    }

    /// An idle channel of the current connection, or a new one in confirm mode.
    async fn take_channel(&self) -> Result<PooledChannel, SinkError> {
        loop {
            let candidate = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(pooled) = candidate else { break };
            if self.is_usable(&pooled) {
                return Ok(pooled);
            }
            // Stale (dropping closes it if it is still open); look at the next one.
        }
        let (connection, generation) = self.live_connection().await?;
        let opened =
            tokio::time::timeout(self.config.connect_timeout, confirm_channel(&connection)).await;
        match opened {
            Ok(Ok(channel)) => Ok(PooledChannel {
                channel,
                generation,
            }),
            Ok(Err(error)) => Err(SinkError::new(format!(
                "cannot open a channel to RabbitMQ at {}: {}; the next publish tries again{}",
                self.shown_url,
                self.scrub(&error.to_string()),
                if matches!(error.kind(), ErrorKind::ChannelsLimitReached) {
                    " (the broker's channel_max is lower than the channels this relay needs: raise it)"
                } else {
                    ""
                }
            ))),
            Err(_) => Err(SinkError::new(format!(
                "opening a channel to RabbitMQ at {} took longer than {:?}; is the broker overloaded?",
                self.shown_url, self.config.connect_timeout
            ))),
        }
    }

    fn is_usable(&self, pooled: &PooledChannel) -> bool {
        pooled.generation == self.generation.load(Ordering::Acquire)
            && pooled.channel.status().connected()
            && !self.closed.load(Ordering::Acquire)
    }

    fn put_back(&self, pooled: PooledChannel) {
        if self.is_usable(&pooled) {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(pooled);
        }
    }

    /// The current connection, reconnecting (once for all waiting callers) if it is gone.
    async fn live_connection(&self) -> Result<(Arc<Connection>, u64), SinkError> {
        let asked_at = Instant::now();
        let mut slot = self.connection.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        if let Some(live) = &slot.live
            && live.connection.status().connected()
        {
            return Ok((live.connection.clone(), live.generation));
        }
        if let Some((failed_at, error)) = &slot.last_failure
            && *failed_at >= asked_at
        {
            // Someone tried while this caller waited for the lock: don't hammer the broker.
            return Err(error.clone());
        }
        slot.live = None;
        let generation = self.generation.load(Ordering::Acquire) + 1;
        match open(&self.uri, &self.config, &self.shown_url).await {
            Ok(connection) => {
                self.frame_max
                    .store(connection.configuration().frame_max(), Ordering::Release);
                let connection = Arc::new(connection);
                self.generation.store(generation, Ordering::Release);
                slot.live = Some(Live {
                    connection: connection.clone(),
                    generation,
                });
                slot.last_failure = None;
                tracing::info!(url = %self.shown_url, generation, "reconnected to RabbitMQ");
                Ok((connection, generation))
            }
            Err(reason) => {
                let error = SinkError::new(format!(
                    "cannot reconnect to RabbitMQ at {reason} (the next publish tries again)"
                ));
                tracing::warn!(%error, "RabbitMQ reconnect failed");
                slot.last_failure = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    fn closed_error(&self) -> SinkError {
        SinkError::new(format!(
            "the RabbitMQ sink for {} is closed (the relay is shutting down)",
            self.shown_url
        ))
    }
}

impl RabbitMqSink {
    /// Refuse, before it reaches the broker, what RabbitMQ would answer by closing
    /// the connection (a header frame over `frame_max`) or the channel (a body over
    /// `max_message_size`). Both are permanent: the event can never be sent as it is.
    fn check_size(&self, event: &OutboxEvent, publication: &Publication) -> Result<(), SinkError> {
        if event.payload.len() > self.config.max_message_bytes {
            return Err(SinkError::permanent(format!(
                "the payload is {} bytes, over rabbitmq.max_message_bytes ({} bytes, which should \
                 match the broker's max_message_size); send a reference to the data instead, or \
                 raise both limits",
                event.payload.len(),
                self.config.max_message_bytes
            )));
        }
        let frame_max = self.frame_max.load(Ordering::Acquire) as usize;
        let needed = header_frame_bytes(&publication.properties);
        if frame_max > 0 && needed > frame_max {
            return Err(SinkError::permanent(format!(
                "the message's headers and properties need a {needed}-byte header frame, over the \
                 {frame_max}-byte frame size (frame_max) negotiated with RabbitMQ, which would close \
                 the whole connection (501 FRAME_ERROR); send fewer or shorter headers (outbox-core \
                 allows 16 KiB per value, 64 KiB in total) and put large data in the payload"
            )));
        }
        Ok(())
    }

    fn is_suspect(&self, id: &EventId) -> bool {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    fn set_suspect(&self, id: EventId, suspect: bool) {
        let mut suspects = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
        if suspect {
            if suspects.len() >= MAX_SUSPECTS {
                suspects.clear();
            }
            suspects.insert(id);
        } else {
            suspects.remove(&id);
        }
    }
}

/// Shared by ordinary publishes, exclusive for a suspect's.
enum Turn<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Alone(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

impl Sink for RabbitMqSink {
    async fn publish(&self, event: &OutboxEvent, route: &Route) -> Outcome {
        let publication = match publication(event, route, &self.app_id, Utc::now().timestamp()) {
            Ok(publication) => publication,
            Err(error) => return Outcome::Rejected(error),
        };
        if let Err(error) = self.check_size(event, &publication) {
            return Outcome::Rejected(error);
        }
        let suspect = self.is_suspect(&event.event_id);
        // Waiting for the others to finish is not this publish's time.
        let turn = if suspect {
            tracing::info!(
                event_id = %event.event_id,
                "publishing alone an event that was in flight when RabbitMQ closed the connection"
            );
            Turn::Alone(self.isolation.write().await)
        } else {
            Turn::Shared(self.isolation.read().await)
        };
        let timeout = self.config.publish_timeout;
        let mut client_fault = None;
        let attempt = tokio::time::timeout(
            timeout,
            self.publish_on_a_channel(publication, &event.payload, route, &mut client_fault),
        )
        .await;
        drop(turn);
        if let Some(reply) = client_fault {
            if suspect {
                self.set_suspect(event.event_id, false);
                return Outcome::Rejected(SinkError::permanent(format!(
                    "RabbitMQ closed the whole connection ({reply}) when this event was published \
                     alone, as it did when it was published with others: the broker refuses \
                     something in it (headers, properties, size); fix the event"
                )));
            }
            self.set_suspect(event.event_id, true);
        } else if suspect {
            self.set_suspect(event.event_id, false);
        }
        match attempt {
            Ok(outcome) => outcome,
            // The channel in use was dropped with the future, so a late answer cannot be misread.
            Err(_) => Outcome::Retry(SinkError::new(format!(
                "publishing to exchange '{}' did not complete within {timeout:?} (no channel, \
                 connection or confirm from RabbitMQ at {}); is the broker overloaded, unreachable \
                 or blocking publishers (memory or disk alarm)?",
                route.destination, self.shown_url
            ))),
        }
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.channels.close();
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        let graceful = async {
            let closes = idle
                .iter()
                .map(|pooled| pooled.channel.close(REPLY_SUCCESS, "OK".into()));
            // Errors on close change nothing: the relay is done with the broker.
            let _ = futures_util::future::join_all(closes).await;
            let live = self.connection.lock().await.live.take();
            if let Some(live) = live {
                let _ = live.connection.close(REPLY_SUCCESS, "OK".into()).await;
            }
        };
        if tokio::time::timeout(self.config.connect_timeout, graceful)
            .await
            .is_err()
        {
            tracing::warn!(url = %self.shown_url, "closing the RabbitMQ connection timed out");
        }
    }
}

/// The TLS settings of `config`: the CA file's certificates, read now so that a
/// missing or unreadable file is named at start.
fn tls_config(config: &RabbitMqConfig) -> Result<lapin::tcp::OwnedTLSConfig, String> {
    let cert_chain = match &config.tls_ca_file {
        None => None,
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|error| {
                format!(
                    "cannot read rabbitmq.tls_ca_file {}: {error}; set it to the PEM file of the \
                     CA that signed the broker's certificate",
                    path.display()
                )
            })?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!(
                    "rabbitmq.tls_ca_file {} holds no PEM certificate; set it to the PEM file \
                     of the CA that signed the broker's certificate",
                    path.display()
                ));
            }
            Some(pem)
        }
    };
    Ok(lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain,
    })
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Connect and declare the exchanges, within `connect_timeout`. The error starts with the masked url.
async fn open(
    uri: &AMQPUri,
    config: &RabbitMqConfig,
    shown_url: &str,
) -> Result<Connection, String> {
    let password = uri.authority.userinfo.password.as_str();
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("outbox-relay {}", config.app_id)));
    let tls = tls_config(config).map_err(|reason| format!("{shown_url}: {reason}"))?;
    let runtime = lapin::runtime::default_runtime()
        .map_err(|error| format!("{shown_url}: no async runtime for the AMQP client: {error}"))?;
    let work = async {
        let connection = Connection::connect_uri_with_config(uri.clone(), properties, tls, runtime)
            .await
            .map_err(|error| {
                format!(
                    "{shown_url}: {}",
                    connect_hint(&scrub(&error.to_string(), &config.url, password), &error)
                )
            })?;
        if !config.declare_exchanges.is_empty() {
            let declare_failed = |error: lapin::Error| {
                format!(
                    "{shown_url}: cannot open a channel to declare exchanges: {}",
                    scrub(&error.to_string(), &config.url, password)
                )
            };
            let channel = connection.create_channel().await.map_err(declare_failed)?;
            for declaration in &config.declare_exchanges {
                declare(&channel, declaration).await.map_err(|reason| {
                    format!(
                        "{shown_url}: cannot declare exchange '{}' ({}, {}): {reason}",
                        declaration.name,
                        declaration.kind.name(),
                        if declaration.durable {
                            "durable"
                        } else {
                            "transient"
                        },
                    )
                })?;
            }
            let _ = channel.close(REPLY_SUCCESS, "OK".into()).await;
        }
        Ok(connection)
    };
    match tokio::time::timeout(config.connect_timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "{shown_url}: no answer within {:?}; is the host reachable (firewall, DNS) and the \
             port an AMQP port (5672, or 5671 for amqps)?",
            config.connect_timeout
        )),
    }
}

async fn declare(channel: &Channel, declaration: &ExchangeDeclaration) -> Result<(), String> {
    let name = check_short("exchange name", &declaration.name).map_err(|e| e.message)?;
    let options = ExchangeDeclareOptions {
        durable: declaration.durable,
        ..ExchangeDeclareOptions::default()
    };
    let declared = channel
        .exchange_declare(
            name,
            declaration.kind.as_lapin(),
            options,
            FieldTable::default(),
        )
        .await;
    let Err(error) = declared else { return Ok(()) };
    Err(match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let hint = match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                    "it exists with other settings: make declare_exchanges match it, or delete the exchange"
                }
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                    "grant the user in the url configure permission on it (names starting with 'amq.' are reserved)"
                }
                _ => "check the exchange settings and the broker log",
            };
            format!("{}; {hint}", reply(amqp))
        }
        _ => format!("{error}; is the broker still reachable?"),
    })
}

/// The reason of a failed connect, with what to check.
fn connect_hint(text: &str, error: &lapin::Error) -> String {
    match error.kind() {
        ErrorKind::IOError(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("connection refused ({text}); is RabbitMQ running and the url right?")
        }
        ErrorKind::IOError(_) if text.contains("certificate") => format!(
            "TLS to the broker failed ({text}); with amqps the broker's certificate must be signed \
             by a CA in rabbitmq.tls_ca_file (or the system's trust store) and name the url's host"
        ),
        ErrorKind::IOError(_) => {
            format!(
                "{text}; check the host and port in the url, the network, and TLS settings for amqps"
            )
        }
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => format!(
                "the broker refused the login ({}); check the user and password in the url",
                reply(amqp)
            ),
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => format!(
                "the broker refused access to the vhost ({}); check the vhost in the url \
                 (the default vhost is written %2f) and the user's permissions on it",
                reply(amqp)
            ),
            _ => format!("{}; check the url and the broker log", reply(amqp)),
        },
        _ => format!("{text}; check the url, and that the server speaks AMQP 0-9-1"),
    }
}

/// The broker's reply when it closed the connection because of what the client
/// sent (a frame too large or malformed), as opposed to a restart or an outage.
fn closed_for_what_the_client_sent(error: &lapin::Error) -> Option<String> {
    let ErrorKind::ProtocolError(amqp) = error.kind() else {
        return None;
    };
    match amqp.kind() {
        AMQPErrorKind::Hard(
            AMQPHardError::FRAMEERROR
            | AMQPHardError::SYNTAXERROR
            | AMQPHardError::COMMANDINVALID
            | AMQPHardError::UNEXPECTEDFRAME,
        ) => Some(reply(amqp)),
        _ => None,
    }
}

/// Size of the content header frame that carries `properties`, in bytes, as
/// AMQP 0-9-1 encodes it; it must not exceed the negotiated `frame_max`.
fn header_frame_bytes(properties: &BasicProperties) -> usize {
    let short = |value: &Option<ShortString>| value.as_ref().map_or(0, |s| 1 + s.as_str().len());
    let mut bytes = HEADER_FRAME_OVERHEAD_BYTES;
    bytes += short(properties.content_type());
    bytes += short(properties.content_encoding());
    if let Some(headers) = properties.headers() {
        bytes += field_table_bytes(headers);
    }
    bytes += properties.delivery_mode().map_or(0, |_| 1);
    bytes += properties.priority().map_or(0, |_| 1);
    bytes += short(properties.correlation_id());
    bytes += short(properties.reply_to());
    bytes += short(properties.expiration());
    bytes += short(properties.message_id());
    bytes += properties.timestamp().map_or(0, |_| 8);
    bytes += short(properties.kind());
    bytes += short(properties.user_id());
    bytes += short(properties.app_id());
    bytes += short(properties.cluster_id());
    bytes
}

fn field_table_bytes(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(name, value)| 1 + name.as_str().len() + 1 + field_value_bytes(value))
        .sum::<usize>()
}

/// Encoded size of a field value without its type octet. The relay only sends
/// long strings and long-long integers; other types are sized generously.
fn field_value_bytes(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::FieldTable(table) => field_table_bytes(table),
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        _ => 8,
    }
}

/// `404 NOT_FOUND - no exchange 'x' in vhost '/'`
fn reply(amqp: &AMQPError) -> String {
    format!("{} {}", amqp.get_id(), amqp.get_message())
}

/// Properties, headers and names of one message; an error here is the event's own fault.
fn publication(
    event: &OutboxEvent,
    route: &Route,
    app_id: &ShortString,
    now_unix_seconds: i64,
) -> Result<Publication, SinkError> {
    let exchange = check_short("exchange name", &route.destination)?;
    let routing_key = check_short("routing key", &route.key)?;
    let kind = check_short("event type", &event.event_type)?;
    let message_id = event.event_id.to_string();

    let mut headers = FieldTable::default();
    for (name, value) in &event.headers {
        let name = check_short("header name", name)?;
        headers.insert(
            name,
            AMQPValue::LongString(LongString::from(value.as_bytes())),
        );
    }
    // Wire headers last, so that they win over a writer header of the same name.
    let text = |value: &str| AMQPValue::LongString(LongString::from(value.as_bytes()));
    headers.insert(wire::EVENT_ID.into(), text(&message_id));
    headers.insert(wire::EVENT_TYPE.into(), text(&event.event_type));
    headers.insert(wire::AGGREGATE_TYPE.into(), text(&event.aggregate_type));
    headers.insert(wire::AGGREGATE_ID.into(), text(&event.aggregate_id));
    headers.insert(wire::PARTITION_KEY.into(), text(&event.partition_key));
    headers.insert(
        wire::CREATED_AT.into(),
        text(
            &event
                .created_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        ),
    );
    headers.insert(
        wire::SEQUENCE.into(),
        AMQPValue::LongLongInt(event.sequence),
    );

    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.as_str().into())
        .with_type(kind)
        .with_timestamp(u64::try_from(now_unix_seconds).unwrap_or_default())
        .with_app_id(app_id.clone())
        .with_headers(headers);
    if let Some(correlation_id) = event.headers.get(CORRELATION_ID_HEADER) {
        match ShortString::try_new(correlation_id.clone()) {
            Ok(correlation_id) => properties = properties.with_correlation_id(correlation_id),
            // Still on the wire as a header; only the property cannot hold it.
            Err(_) => tracing::warn!(
                event_id = %message_id,
                bytes = correlation_id.len(),
                "correlation-id header is too long for the correlation_id property; sent as a header only"
            ),
        }
    }
    Ok(Publication {
        exchange,
        routing_key,
        message_id,
        properties,
    })
}

/// A name that AMQP cannot carry can never be published: a permanent rejection.
fn check_short(what: &str, value: &str) -> Result<ShortString, SinkError> {
    ShortString::try_new(value).map_err(|_| {
        let start: String = value.chars().take(40).collect();
        SinkError::permanent(format!(
            "{what} '{start}…' is {} bytes; AMQP allows at most {MAX_SHORT_STRING_BYTES}: shorten it",
            value.len()
        ))
    })
}

/// Parse the url, keeping an IP-literal host that the url parser would replace by
/// `localhost`. Errors show `shown_url` and never the password.
pub(crate) fn parse_url(url: &str, shown_url: &str) -> Result<AMQPUri, SinkError> {
    let mut uri: AMQPUri = url.parse().map_err(|reason: String| {
        let password = password_of(url).unwrap_or_default();
        SinkError::permanent(format!(
            "invalid RabbitMQ url {shown_url}: {}; expected amqp://user:password@host:5672/vhost \
             (percent-encode special characters; the default vhost is %2f)",
            scrub(&reason, url, &password)
        ))
    })?;
    // amq-protocol-uri 10.6 reads the host with `Url::domain`, which is `None` for an IPv6
    // literal (`[::1]`), and then silently falls back to `localhost`.
    if let Some(host) = literal_ip_host(url) {
        uri.authority.host = host;
    }
    Ok(uri)
}

/// The `host` part of `scheme://userinfo@host:port/…` if it is an IP address.
fn literal_ip_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host_port)| host_port);
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host.parse::<IpAddr>().ok().map(|ip| ip.to_string())
}

/// The raw (still percent-encoded) password of a url, if it has one.
fn password_of(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (userinfo, _) = rest.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    Some(password.to_owned())
}

/// The url with its password replaced by `***`. Masks too much rather than too little:
/// everything between the first `:` of the userinfo and the last `@` of the url.
pub fn mask_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}{user}:***@{host}"),
            None => format!("{scheme}{userinfo}@{host}"),
        },
        None => url.to_owned(),
    }
}

/// Remove the url and the password from a library's message. Passwords shorter than
/// four characters are left alone: masking them would garble the message.
fn scrub(text: &str, url: &str, password: &str) -> String {
    let mut text = text.replace(url, &mask_url(url));
    if password.len() >= 4 {
        text = text.replace(password, "***");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_the_password() {
        assert_eq!(
            mask_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(mask_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(mask_url("amqp://user@host"), "amqp://user@host");
        // An unencoded '@' in the password is masked as a whole.
        assert_eq!(mask_url("amqp://u:p@ss@host/v"), "amqp://u:***@host/v");
        let config = RabbitMqConfig {
            url: "amqps://relay:hunter22@mq.example:5671/prod".into(),
            app_id: "outbox-relay".into(),
            connect_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(5),
            declare_exchanges: vec![],
            tls_ca_file: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter22") && shown.contains("relay:***@mq.example"),
            "{shown}"
        );
    }

    #[test]
    fn only_a_close_about_what_the_client_sent_makes_its_events_suspects() {
        let hard = |e: AMQPHardError| {
            lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(
                AMQPErrorKind::Hard(e),
                "FRAME_ERROR - type 2".into(),
            )))
        };
        for fault in [
            AMQPHardError::FRAMEERROR,
            AMQPHardError::SYNTAXERROR,
            AMQPHardError::COMMANDINVALID,
            AMQPHardError::UNEXPECTEDFRAME,
        ] {
            assert!(closed_for_what_the_client_sent(&hard(fault)).is_some());
        }
        // A broker restart or an outage is nobody's event's fault.
        assert!(closed_for_what_the_client_sent(&hard(AMQPHardError::CONNECTIONFORCED)).is_none());
        let io = lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(closed_for_what_the_client_sent(&io).is_none());
    }

    #[test]
    fn ip_hosts_survive_url_parsing() {
        let uri = parse_url("amqp://guest:guest@10.1.2.3:5673/%2f", "-").unwrap();
        assert_eq!(
            (uri.authority.host.as_str(), uri.authority.port),
            ("10.1.2.3", 5673)
        );
        let uri = parse_url("amqp://guest:guest@[::1]:5672/%2f", "-").unwrap();
        assert_eq!(uri.authority.host, "::1");
        let uri = parse_url("amqp://guest:guest@rabbit.internal/%2f", "-").unwrap();
        assert_eq!(uri.authority.host, "rabbit.internal");
        assert_eq!(uri.vhost, "/");
    }

    #[test]
    fn bad_urls_are_refused_without_the_password() {
        let err = parse_url(
            "amqp://guest:topsecret@host:notaport/%2f",
            "amqp://guest:***@host:notaport/%2f",
        )
        .unwrap_err();
        assert!(!err.message.contains("topsecret"), "{err}");
        assert!(err.message.contains("expected amqp://"), "{err}");
    }

    #[test]
    fn names_longer_than_an_amqp_short_string_are_the_events_fault() {
        let event = OutboxEvent {
            sequence: 7,
            event_id: outbox_core::EventId::new(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            event_type: "order.placed".into(),
            partition_key: "order:42".into(),
            destination: None,
            payload: b"{}".to_vec(),
            headers: Default::default(),
            created_at: Utc::now(),
            attempts: 0,
        };
        let route = Route {
            destination: "orders".into(),
            key: "k".repeat(256),
        };
        let err = publication(&event, &route, &"app".into(), 0).err().unwrap();
        assert!(
            err.message.contains("routing key") && err.message.contains("256 bytes"),
            "{err}"
        );
        assert!(err.is_permanent(), "no retry can make it shorter");
    }
}
