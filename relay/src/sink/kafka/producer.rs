//! The idempotent producer: creating and replacing it, topic checks, and the
//! publish that awaits its delivery report.

use super::*;

/// Recent answers to "does this topic exist?", see `missing_topic`.
#[derive(Default)]
pub(super) struct TopicChecks {
    /// The last lookup got no answer: until then, timeouts are not looked into.
    pub(super) unreachable_until: Option<Instant>,
    /// Topic → (when looked up, why it cannot take records).
    pub(super) verdicts: HashMap<String, (Instant, Option<String>)>,
}

pub(super) type SinkProducer = FutureProducer<SinkContext>;

pub(super) struct Current {
    pub(super) producer: SinkProducer,
    /// Incremented each time a fatally failed producer is replaced.
    pub(super) generation: u64,
}

/// Forwards librdkafka's log lines and client errors to `tracing`, and keeps the
/// last client error so that a failed start can say what went wrong.
pub(super) struct SinkContext {
    pub(super) brokers: String,
    pub(super) last_error: Arc<StdMutex<Option<String>>>,
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let brokers = self.brokers.as_str();
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::error!(target: "librdkafka", brokers, facility, "{message}")
            }
            // Connection failures are logged as errors by librdkafka, yet they are
            // retried; the relay reports the outcome of each publish itself.
            RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", brokers, facility, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", brokers, facility, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", brokers, facility, "{message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", brokers = %self.brokers, %error, "{reason}");
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        // "n/n brokers are down" says less than the connect failure before it.
        if last.is_none() || error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *last = Some(reason.to_owned());
        }
    }
}

impl KafkaSink {
    /// Check the configuration, create the idempotent producer and check that the
    /// brokers answer (a metadata request within [`CONNECT_TIMEOUT`]).
    ///
    /// Errors name the brokers and what to check; secret settings are never shown.
    pub async fn connect(config: KafkaConfig) -> Result<Self, SinkError> {
        // Settings errors: no retry can help.
        let client_config =
            client_config(&config).map_err(|error| SinkError::permanent(error.message))?;
        let last_error = Arc::new(StdMutex::new(None));
        let producer = create_producer(&client_config, &config, last_error.clone())
            .map_err(|error| SinkError::permanent(error.message))?;
        let brokers = config.brokers.clone();
        let probe = producer.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, CONNECT_TIMEOUT)
                .map(|metadata| metadata.brokers().len())
        })
        .await;
        let reachable = match metadata {
            Ok(Ok(0)) => Err("the cluster's metadata lists no brokers".to_owned()),
            Ok(Ok(count)) => Ok(count),
            Ok(Err(error)) => {
                let last = last_error.lock().unwrap_or_else(|e| e.into_inner()).take();
                Err(connect_hint(&error, last.as_deref()))
            }
            Err(join) => Err(format!("the metadata request failed: {join}")),
        };
        let broker_count = match reachable {
            Ok(count) => count,
            Err(reason) => {
                // Dropping a producer blocks until librdkafka has shut its threads down.
                let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
                return Err(SinkError::new(format!(
                    "cannot reach the Kafka brokers {brokers} within {CONNECT_TIMEOUT:?}: {reason}"
                )));
            }
        };
        tracing::info!(
            brokers = %config.brokers,
            broker_count,
            partitioner = %config.partitioner,
            max_message_bytes = config.max_message_bytes,
            "connected to Kafka"
        );
        let topic_limits = TopicLimits::new(&client_config);
        Ok(KafkaSink {
            config,
            client_config,
            topic_limits,
            producer: RwLock::new(Current {
                producer,
                generation: 1,
            }),
            topic_checks: tokio::sync::Mutex::new(TopicChecks::default()),
            closed: AtomicBool::new(false),
        })
    }

    /// The configuration this sink was built with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    pub(super) fn current(&self) -> (SinkProducer, u64) {
        let current = self.producer.read().unwrap_or_else(|e| e.into_inner());
        (current.producer.clone(), current.generation)
    }

    /// Enqueue one record; the future resolves with its delivery report.
    pub(super) fn enqueue(
        &self,
        producer: &SinkProducer,
        event: &OutboxEvent,
        route: &Route,
        record: &Record<'_>,
    ) -> Result<DeliveryFuture, KafkaError> {
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |headers, (name, value)| {
                headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                })
            },
        );
        let mut future_record = FutureRecord::to(&route.destination)
            .key(route.key.as_bytes())
            .payload(event.payload.as_slice())
            .headers(headers)
            .timestamp(Utc::now().timestamp_millis());
        if let Some(partition) = self.config.explicit_partition {
            future_record = future_record.partition(partition);
        }
        producer
            .send_result(future_record)
            .map_err(|(error, _record)| error)
    }

    /// The outcome of a record that librdkafka reported as failed.
    pub(super) async fn failed(
        &self,
        error: &KafkaError,
        route: &Route,
        record: &Record<'_>,
        producer: SinkProducer,
        generation: u64,
    ) -> Outcome {
        let topic = &route.destination;
        match classify(error) {
            Classification::Rejected => {
                let message = rejected_message(error, topic, record, &self.config);
                Outcome::Rejected(if is_permanent(error) {
                    SinkError::permanent(message)
                } else {
                    SinkError::new(message)
                })
            }
            Classification::TimedOut => match self.missing_topic(producer, topic).await {
                Some(reason) => Outcome::Rejected(SinkError::new(format!(
                    "{reason} (the delivery timed out after {:?}: {error}); create it (topic \
                     auto-creation is off on this cluster) or fix the route",
                    self.config.message_timeout
                ))),
                None => Outcome::Retry(SinkError::new(format!(
                    "no delivery report from Kafka for topic '{topic}' within message_timeout \
                     {:?} ({error}); are the brokers {} reachable and the partition's leader \
                     available? The event will be published again",
                    self.config.message_timeout, self.config.brokers
                ))),
            },
            Classification::ProducerFailed => {
                let reason = producer
                    .client()
                    .fatal_error()
                    .map(|(code, reason)| format!("{code}: {reason}"))
                    .unwrap_or_else(|| error.to_string());
                let replaced = self.replace_producer(generation, &reason).await;
                Outcome::Retry(SinkError::new(format!(
                    "the Kafka producer failed fatally while publishing to topic '{topic}' \
                     ({reason}); {replaced}, and the event will be published again"
                )))
            }
            Classification::Retry => Outcome::Retry(SinkError::new(retry_message(
                error,
                topic,
                &self.config.brokers,
            ))),
        }
    }

    /// Why `topic` cannot take records, if the broker says it does not exist (or
    /// lacks the explicit partition); `None` if it exists or the broker does not answer.
    ///
    /// Verdicts are shared for [`TOPIC_CHECK_TTL`]: when a broker outage times out
    /// every publish at once, one lookup answers all of them.
    pub(super) async fn missing_topic(
        &self,
        producer: SinkProducer,
        topic: &str,
    ) -> Option<String> {
        let mut checks = self.topic_checks.lock().await;
        let now = Instant::now();
        if checks.unreachable_until.is_some_and(|until| until > now) {
            return None;
        }
        if let Some((checked_at, verdict)) = checks.verdicts.get(topic)
            && now.duration_since(*checked_at) < TOPIC_CHECK_TTL
        {
            return verdict.clone();
        }
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), TOPIC_CHECK_TIMEOUT)
                .map(|metadata| {
                    metadata
                        .topics()
                        .iter()
                        .find(|t| t.name() == name)
                        .map(|t| (t.error().map(RDKafkaErrorCode::from), t.partitions().len()))
                })
        })
        .await;
        let now = Instant::now();
        let Ok(Ok(found)) = metadata else {
            checks.unreachable_until = Some(now + TOPIC_CHECK_TTL);
            return None;
        };
        let verdict = match found {
            None
            | Some((
                Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic),
                _,
            )) => Some(format!(
                "topic '{topic}' does not exist on the brokers {}",
                self.config.brokers
            )),
            Some((None, partitions)) => match self.config.explicit_partition {
                Some(partition) if usize::try_from(partition).is_ok_and(|p| p >= partitions) => {
                    Some(format!(
                        "topic '{topic}' has {partitions} partitions, so explicit_partition \
                         {partition} does not exist"
                    ))
                }
                _ => None,
            },
            Some((Some(_), _)) => None,
        };
        checks
            .verdicts
            .retain(|_, (checked_at, _)| now.duration_since(*checked_at) < TOPIC_CHECK_TTL);
        checks
            .verdicts
            .insert(topic.to_owned(), (now, verdict.clone()));
        verdict
    }

    /// Replace a fatally failed producer (once for all callers that saw it fail).
    pub(super) async fn replace_producer(&self, failed_generation: u64, reason: &str) -> String {
        let old = {
            let mut current = self.producer.write().unwrap_or_else(|e| e.into_inner());
            if current.generation != failed_generation {
                return "another publish already replaced it".to_owned();
            }
            let last_error = Arc::new(StdMutex::new(None));
            let fresh = match create_producer(&self.client_config, &self.config, last_error) {
                Ok(fresh) => fresh,
                Err(error) => return format!("replacing it failed ({error})"),
            };
            current.generation += 1;
            tracing::warn!(
                brokers = %self.config.brokers,
                generation = current.generation,
                reason,
                "the Kafka producer failed fatally; replaced it with a new one"
            );
            std::mem::replace(&mut current.producer, fresh)
        };
        // Dropping purges what the old producer still held (those publishes report a
        // failure and are retried) and blocks until its threads are gone.
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        "it was replaced by a new producer".to_owned()
    }

    pub(super) fn closed_error(&self) -> SinkError {
        SinkError::new(format!(
            "the Kafka sink for {} is closed (the relay is shutting down)",
            self.config.brokers
        ))
    }
}

pub(super) fn create_producer(
    client: &ClientConfig,
    config: &KafkaConfig,
    last_error: Arc<StdMutex<Option<String>>>,
) -> Result<SinkProducer, SinkError> {
    let context = SinkContext {
        brokers: config.brokers.clone(),
        last_error,
    };
    client.create_with_context(context).map_err(|error| {
        let reason = match &error {
            KafkaError::ClientConfig(_, description, key, value) => {
                format!("{key}={}: {description}", shown_value(key, value))
            }
            // Creation errors quote librdkafka's reason, not setting values.
            other => other.to_string(),
        };
        SinkError::new(format!(
            "cannot create the Kafka producer for {}: {reason}; check the settings in extra",
            config.brokers
        ))
    })
}
