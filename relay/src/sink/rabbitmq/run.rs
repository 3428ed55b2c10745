//! A key's run with several publishes outstanding on one channel, opt-in with
//! `rabbitmq.max_in_flight_per_key` > 1.
//!
//! **Per-event verdicts.** The events of a window go to one exchange with one
//! routing key, on one channel taken for the window alone, and every confirm is
//! awaited before any verdict: RabbitMQ sends a message's return before its
//! confirm, but confirms of different messages may come in any order, and lapin
//! attaches a pending return to whichever confirm it reads next. So returns are
//! matched to events by message id across the whole window, and an event is
//! delivered only if its confirm is an ack and no return carries its id.
//!
//! **Order.** A window's events either route the same way or not at all, so an
//! unroutable event fails with its successors (unless a binding is added in the
//! middle of the window). A nack is the exception: a queue at its length limit with
//! `x-overflow = reject-publish` can refuse one message and take the next, and the
//! later event is then first-delivered before the refused one. Hence the default
//! of 1. If it happens, the later event is reported as not delivered (it is
//! published again after its predecessor) and an error is logged.
//!
//! **Suspects** (events in flight when RabbitMQ closed the connection for something
//! the client sent) are never part of a window: they go alone through
//! [`Sink::publish`], which tells the culprit from the bystanders.

use super::*;

/// One event of a window: its publication, ready to send.
struct Ready<'a> {
    event: &'a OutboxEvent,
    route: &'a Route,
    publication: Publication,
}

impl RabbitMqSink {
    /// A run of one key in windows of up to `max_in_flight_per_key` events to one
    /// exchange and routing key; the outcomes of a delivered prefix and of the first
    /// event that was not delivered.
    pub(super) async fn publish_overlapped(&self, run: &[(&OutboxEvent, Route)]) -> Vec<Outcome> {
        let window = self.config.max_in_flight_per_key.max(1);
        let mut outcomes = Vec::with_capacity(run.len());
        let mut start = 0;
        while start < run.len() {
            let first_route = &run[start].1;
            let end = start
                + run[start..]
                    .iter()
                    .take(window)
                    .take_while(|(event, route)| {
                        route == first_route && !self.is_suspect(&event.event_id)
                    })
                    .count();
            let verdicts = if end - start <= 1 {
                let (event, route) = &run[start];
                vec![self.publish(event, route).await]
            } else {
                self.publish_window(&run[start..end]).await
            };
            let settled = verdicts.len() == (end - start).max(1)
                && verdicts.iter().all(|v| matches!(v, Outcome::Delivered));
            outcomes.extend(verdicts);
            if !settled {
                break;
            }
            start = end.max(start + 1);
        }
        outcomes
    }

    /// One window: checks, publishes on one channel, every confirm, then the
    /// verdicts of a delivered prefix and of the first failure.
    async fn publish_window(&self, window: &[(&OutboxEvent, Route)]) -> Vec<Outcome> {
        let mut ready = Vec::with_capacity(window.len());
        let mut unsent = None;
        for (event, route) in window {
            let checked = publication(event, route, &self.app_id, Utc::now().timestamp())
                .and_then(|publication| self.check_size(event, &publication).map(|()| publication));
            match checked {
                Ok(publication) => ready.push(Ready {
                    event,
                    route,
                    publication,
                }),
                Err(error) => {
                    unsent = Some(Outcome::Rejected(error));
                    break;
                }
            }
        }
        if ready.is_empty() {
            return unsent.into_iter().collect();
        }
        let timeout = self.config.publish_timeout;
        let mut client_fault = None;
        let turn = self.isolation.read().await;
        let sent = tokio::time::timeout(
            timeout,
            self.publish_on_one_channel(&ready, &mut client_fault),
        )
        .await;
        drop(turn);
        if client_fault.is_some() {
            // Which event the broker objected to is not known: each goes alone next time.
            for item in &ready {
                self.set_suspect(item.event.event_id, true);
            }
        }
        let verdicts = match sent {
            Ok(verdicts) => verdicts,
            // The channel was dropped with the future; the window is published again.
            Err(_) => {
                return vec![Outcome::Retry(SinkError::new(format!(
                    "publishing {} events to exchange '{}' did not complete within {timeout:?} \
                     (no channel, connection or confirms from RabbitMQ at {}); is the broker \
                     overloaded, unreachable or blocking publishers (memory or disk alarm)?",
                    ready.len(),
                    ready[0].route.destination,
                    self.shown_url
                )))];
            }
        };
        let mut outcomes = Vec::with_capacity(verdicts.len() + 1);
        let mut failed: Option<i64> = None;
        for (item, verdict) in ready.iter().zip(verdicts) {
            match failed {
                None => {
                    if !matches!(verdict, Outcome::Delivered) {
                        failed = Some(item.event.sequence);
                    }
                    outcomes.push(verdict);
                }
                Some(failed_sequence) => {
                    if matches!(verdict, Outcome::Delivered) {
                        tracing::error!(
                            sequence = item.event.sequence,
                            event_id = %item.event.event_id,
                            failed_sequence,
                            exchange = %item.route.destination,
                            "RabbitMQ took an event after refusing an earlier event of its key \
                             (a queue rejecting publishes?); it is published again after that \
                             one, so consumers see it twice, once ahead of its predecessor; set \
                             rabbitmq.max_in_flight_per_key = 1 for such queues"
                        );
                    }
                }
            }
        }
        if failed.is_none()
            && outcomes.len() == ready.len()
            && let Some(outcome) = unsent
        {
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Publish `ready` on one channel and await every confirm: one verdict per
    /// event for a prefix of them (all of them unless a publish itself failed).
    async fn publish_on_one_channel(
        &self,
        ready: &[Ready<'_>],
        client_fault: &mut Option<String>,
    ) -> Vec<Outcome> {
        let Ok(_permit) = self.channels.acquire().await else {
            return vec![Outcome::Retry(self.closed_error())];
        };
        let pooled = match self.take_channel().await {
            Ok(pooled) => pooled,
            Err(error) => return vec![Outcome::Retry(error)],
        };
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let mut confirms = Vec::with_capacity(ready.len());
        let mut publish_failure = None;
        for item in ready {
            let published = pooled
                .channel
                .basic_publish(
                    item.publication.exchange.clone(),
                    item.publication.routing_key.clone(),
                    options,
                    &item.event.payload,
                    item.publication.properties.clone(),
                )
                .await;
            match published {
                Ok(confirm) => confirms.push(confirm),
                Err(error) => {
                    *client_fault = closed_for_what_the_client_sent(&error);
                    publish_failure = Some(self.failed(&error, item.route));
                    break;
                }
            }
        }
        let mut confirmations = Vec::with_capacity(confirms.len());
        for confirm in confirms {
            confirmations.push(confirm.await);
        }
        // Returns by message id, whichever confirm lapin attached them to.
        let mut returned = HashMap::new();
        for confirmation in &confirmations {
            if let Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message))) =
                confirmation
                && let Some(id) = message.properties.message_id()
            {
                returned.insert(
                    id.as_str().to_owned(),
                    (message.reply_code, message.reply_text.to_string()),
                );
            }
        }
        let mut channel_usable = publish_failure.is_none();
        let mut verdicts = Vec::with_capacity(ready.len());
        for (item, confirmation) in ready.iter().zip(confirmations) {
            let verdict = match (
                returned.remove(item.publication.message_id.as_str()),
                confirmation,
            ) {
                (Some((code, text)), _) => unroutable(item.route, code, &text),
                (None, Ok(Confirmation::Ack(_))) => Outcome::Delivered,
                (None, Ok(Confirmation::Nack(_))) => nacked(item.route),
                (None, Ok(Confirmation::NotRequested)) => {
                    channel_usable = false;
                    not_confirmed()
                }
                (None, Err(error)) => {
                    channel_usable = false;
                    if client_fault.is_none() {
                        *client_fault = closed_for_what_the_client_sent(&error);
                    }
                    self.failed(&error, item.route)
                }
            };
            verdicts.push(verdict);
        }
        if !returned.is_empty() {
            // A return of no event of this window: this channel's confirms prove nothing more.
            tracing::warn!(
                exchange = %ready[0].route.destination,
                returns = returned.len(),
                "RabbitMQ returned a message this window did not send; discarding the channel"
            );
            channel_usable = false;
        }
        verdicts.extend(publish_failure);
        if channel_usable {
            self.put_back(pooled);
        }
        verdicts
    }
}
