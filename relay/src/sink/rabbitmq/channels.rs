//! The connection and its pool of channels in confirm mode: connecting,
//! reconnecting, taking and returning channels, declaring exchanges, and the
//! publish on one channel that awaits its confirm.

use super::*;

#[derive(Default)]
pub(super) struct ConnectionSlot {
    pub(super) live: Option<Live>,
    /// The last failed (re)connect; callers that waited for it share its error instead of trying again at once.
    pub(super) last_failure: Option<(Instant, SinkError)>,
}

pub(super) struct Live {
    pub(super) connection: Arc<Connection>,
    pub(super) generation: u64,
}

pub(super) struct PooledChannel {
    pub(super) channel: Channel,
    pub(super) generation: u64,
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
    pub(super) async fn publish_on_a_channel(
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
                    unroutable(route, returned.reply_code, returned.reply_text.as_str())
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
                nacked(route)
            }
            Ok(Confirmation::NotRequested) => not_confirmed(),
            Err(error) => {
                *client_fault = closed_for_what_the_client_sent(&error);
                self.failed(&error, route)
            }
        }
    }

    /// The outcome of a publish that lapin reported as an error.
    pub(super) fn failed(&self, error: &lapin::Error, route: &Route) -> Outcome {
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
    pub(super) fn scrub(&self, text: &str) -> String {
        scrub(
            text,
            &self.config.url,
            &self.uri.authority.userinfo.password,
        )
    }

    /// An idle channel of the current connection, or a new one in confirm mode.
    pub(super) async fn take_channel(&self) -> Result<PooledChannel, SinkError> {
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

    pub(super) fn is_usable(&self, pooled: &PooledChannel) -> bool {
        pooled.generation == self.generation.load(Ordering::Acquire)
            && pooled.channel.status().connected()
            && !self.closed.load(Ordering::Acquire)
    }

    pub(super) fn put_back(&self, pooled: PooledChannel) {
        if self.is_usable(&pooled) {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(pooled);
        }
    }

    /// The current connection, reconnecting (once for all waiting callers) if it is gone.
    pub(super) async fn live_connection(&self) -> Result<(Arc<Connection>, u64), SinkError> {
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

    pub(super) fn closed_error(&self) -> SinkError {
        SinkError::new(format!(
            "the RabbitMQ sink for {} is closed (the relay is shutting down)",
            self.shown_url
        ))
    }
}

/// The outcome of an event RabbitMQ returned as unroutable (`mandatory`).
pub(super) fn unroutable(route: &Route, reply_code: u16, reply_text: &str) -> Outcome {
    Outcome::Rejected(SinkError::new(format!(
        "unroutable: exchange '{}' has no queue bound for routing key '{}' \
         (RabbitMQ returned it: {reply_code} {reply_text}); bind a queue or fix the route",
        route.destination, route.key
    )))
}

/// The outcome of an event RabbitMQ nacked.
pub(super) fn nacked(route: &Route) -> Outcome {
    Outcome::Retry(SinkError::new(format!(
        "RabbitMQ nacked the message for exchange '{}' (it could not take it now, e.g. \
         a queue at its length limit with overflow=reject-publish or an internal error); \
         it will be published again",
        route.destination
    )))
}

/// The outcome of a publish on a channel that was not in confirm mode.
pub(super) fn not_confirmed() -> Outcome {
    Outcome::Retry(SinkError::new(
        "the channel was not in publisher-confirm mode, so RabbitMQ did not confirm the \
         message; the channel was discarded and the event will be published again",
    ))
}

pub(super) async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Connect and declare the exchanges, within `connect_timeout`. The error starts with the masked url.
pub(super) async fn open(
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

pub(super) async fn declare(
    channel: &Channel,
    declaration: &ExchangeDeclaration,
) -> Result<(), String> {
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
pub(super) fn connect_hint(text: &str, error: &lapin::Error) -> String {
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
pub(super) fn closed_for_what_the_client_sent(error: &lapin::Error) -> Option<String> {
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
