//! Publishing: one event's checks, enqueue and delivery report, and a key's run
//! with several events in flight at once.
//!
//! **Why overlapping keeps a key's order.** A key's events go to one partition in
//! the order they are enqueued, and the idempotent producer keeps a partition's
//! order across its own retries (sequence numbers, at most
//! [`MAX_IN_FLIGHT_PER_CONNECTION`] requests per connection). So a run of one key
//! needs no confirm between its events: up to `max_in_flight_per_key` of them
//! are enqueued at once and their delivery reports are read in order.
//!
//! **When it would not, the run waits.** An event the broker refuses for its own
//! sake (a record over the topic's size limit) fails alone, while later events of
//! its key in flight may still be written. So an event is overlapped with its
//! successors only when its size was checked against the topic's own
//! `max.message.bytes` (which leaves no per-record refusal to the broker, only
//! topic-wide ones that refuse its successors as well), and only successors to the
//! same topic and key. The remaining case librdkafka does not order, a delivery
//! that times out at the moment the broker recovers, is detected: the later event
//! is reported as not delivered, published again after its predecessor, and an
//! error is logged.

use std::collections::VecDeque;

use super::*;

/// An event handed to librdkafka, waiting for its delivery report.
pub(super) struct Prepared<'a> {
    event: &'a OutboxEvent,
    route: &'a Route,
    record: Record<'a>,
    delivery: DeliveryFuture,
    producer: SinkProducer,
    generation: u64,
    /// Whether its size was checked against the topic's own limit, so that
    /// events after it may be in flight before its report.
    overlappable: bool,
}

impl KafkaSink {
    /// Check `event` against the sink's limits and hand it to librdkafka; `Err`
    /// holds the outcome of an event that was not sent.
    pub(super) async fn prepare<'a>(
        &self,
        event: &'a OutboxEvent,
        route: &'a Route,
    ) -> Result<Prepared<'a>, Outcome> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Outcome::Retry(self.closed_error()));
        }
        if let Err(problem) = check_topic_name(&route.destination) {
            return Err(Outcome::Rejected(SinkError::permanent(problem)));
        }
        let record = record_of(event, route);
        if record.size > self.config.max_message_bytes {
            return Err(Outcome::Rejected(SinkError::permanent(oversize_message(
                &record,
                &route.destination,
                self.config.max_message_bytes,
            ))));
        }
        let limit = self.topic_limits.limit(&route.destination).await;
        if let TopicLimit::MaxMessageBytes(topic_max) = limit {
            let batch = batch_bytes(record.size, record.headers.len());
            if batch > topic_max {
                return Err(Outcome::Rejected(SinkError::new(topic_oversize_message(
                    &record,
                    batch,
                    &route.destination,
                    topic_max,
                ))));
            }
        }
        let (producer, generation) = self.current();
        match self.enqueue(&producer, event, route, &record) {
            Ok(delivery) => Ok(Prepared {
                event,
                route,
                record,
                delivery,
                producer,
                generation,
                overlappable: matches!(limit, TopicLimit::MaxMessageBytes(_)),
            }),
            Err(error) => Err(self
                .failed(&error, route, &record, producer, generation)
                .await),
        }
    }

    /// Wait for the delivery report of a prepared event.
    pub(super) async fn report(&self, prepared: Prepared<'_>) -> Outcome {
        let Prepared {
            route,
            record,
            delivery,
            producer,
            generation,
            ..
        } = prepared;
        let bound = self.config.message_timeout + REPORT_MARGIN;
        match tokio::time::timeout(bound, delivery).await {
            Ok(Ok(Ok(_delivered))) => Outcome::Delivered,
            Ok(Ok(Err((error, _message)))) => {
                self.failed(&error, route, &record, producer, generation)
                    .await
            }
            Ok(Err(_canceled)) => Outcome::Retry(SinkError::new(format!(
                "the Kafka producer was shut down before it reported the delivery to topic \
                 '{}'; the event will be published again",
                route.destination
            ))),
            // The record may still be delivered; a second publish is then a duplicate
            // that follows it in the partition, never an event that overtakes it.
            Err(_) => Outcome::Retry(SinkError::new(format!(
                "no delivery report for topic '{}' within {bound:?} (message_timeout plus \
                 {REPORT_MARGIN:?}); are the brokers {} reachable? The event will be published again",
                route.destination, self.config.brokers
            ))),
        }
    }

    /// A run of one key's events with up to `max_in_flight_per_key` in flight (see
    /// the [module docs](self)); the outcomes of a delivered prefix and of the first
    /// event that was not delivered.
    pub(super) async fn publish_overlapped(&self, run: &[(&OutboxEvent, Route)]) -> Vec<Outcome> {
        let window = self.config.max_in_flight_per_key.max(1);
        let mut outcomes = Vec::with_capacity(run.len());
        let mut in_flight: VecDeque<Prepared<'_>> = VecDeque::new();
        // The first event that failed, once one has: nothing after it counts.
        let mut stopped = false;
        let mut first_failure: Option<(i64, String)> = None;
        // An event that failed before it was sent, reported after those in flight.
        let mut unsent = None;
        'run: for (event, route) in run {
            while let Some(last) = in_flight.back() {
                let must_wait = in_flight.len() >= window
                    || !last.overlappable
                    || last.route.destination != route.destination
                    || last.route.key != route.key;
                if !must_wait {
                    break;
                }
                let Some(oldest) = in_flight.pop_front() else {
                    break;
                };
                let sequence = oldest.event.sequence;
                let outcome = self.report(oldest).await;
                if let Outcome::Retry(error) | Outcome::Rejected(error) = &outcome {
                    first_failure = Some((sequence, error.message.clone()));
                }
                outcomes.push(outcome);
                if first_failure.is_some() {
                    stopped = true;
                    break 'run;
                }
            }
            match self.prepare(event, route).await {
                Ok(prepared) => in_flight.push_back(prepared),
                Err(outcome) => {
                    unsent = Some(outcome);
                    break;
                }
            }
        }
        for prepared in in_flight {
            let (sequence, event_id) = (prepared.event.sequence, prepared.event.event_id);
            let outcome = self.report(prepared).await;
            if stopped {
                if let (Outcome::Delivered, Some((failed_sequence, error))) =
                    (&outcome, &first_failure)
                {
                    tracing::error!(
                        sequence,
                        %event_id,
                        failed_sequence,
                        error = %error,
                        "Kafka wrote an event after an earlier event of its key failed; it is \
                         published again after that one, so consumers see it twice, once ahead \
                         of its predecessor"
                    );
                }
                continue;
            }
            match &outcome {
                Outcome::Delivered => {}
                Outcome::Retry(error) | Outcome::Rejected(error) => {
                    stopped = true;
                    first_failure = Some((sequence, error.message.clone()));
                }
            }
            outcomes.push(outcome);
        }
        if !stopped && let Some(outcome) = unsent {
            outcomes.push(outcome);
        }
        outcomes
    }
}
