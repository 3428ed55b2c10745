//! An event as an AMQP publication (properties, headers), the size checks
//! made before a publish, and the suspects of a connection closed for what it sent.

use super::*;

/// What goes on the wire for one event.
pub(super) struct Publication {
    pub(super) exchange: ShortString,
    pub(super) routing_key: ShortString,
    pub(super) message_id: String,
    pub(super) properties: BasicProperties,
}

impl RabbitMqSink {
    /// Refuse, before it reaches the broker, what RabbitMQ would answer by closing
    /// the connection (a header frame over `frame_max`) or the channel (a body over
    /// `max_message_size`). Both are permanent: the event can never be sent as it is.
    pub(super) fn check_size(
        &self,
        event: &OutboxEvent,
        publication: &Publication,
    ) -> Result<(), SinkError> {
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

    pub(super) fn is_suspect(&self, id: &EventId) -> bool {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    pub(super) fn set_suspect(&self, id: EventId, suspect: bool) {
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
pub(super) enum Turn<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Alone(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

/// Size of the content header frame that carries `properties`, in bytes, as
/// AMQP 0-9-1 encodes it; it must not exceed the negotiated `frame_max`.
pub(super) fn header_frame_bytes(properties: &BasicProperties) -> usize {
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

pub(super) fn field_table_bytes(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(name, value)| 1 + name.as_str().len() + 1 + field_value_bytes(value))
        .sum::<usize>()
}

/// Encoded size of a field value without its type octet. The relay only sends
/// long strings and long-long integers; other types are sized generously.
pub(super) fn field_value_bytes(value: &AMQPValue) -> usize {
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
pub(super) fn reply(amqp: &AMQPError) -> String {
    format!("{} {}", amqp.get_id(), amqp.get_message())
}

/// Properties, headers and names of one message; an error here is the event's own fault.
pub(super) fn publication(
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
pub(super) fn check_short(what: &str, value: &str) -> Result<ShortString, SinkError> {
    ShortString::try_new(value).map_err(|_| {
        let start: String = value.chars().take(40).collect();
        SinkError::permanent(format!(
            "{what} '{start}…' is {} bytes; AMQP allows at most {MAX_SHORT_STRING_BYTES}: shorten it",
            value.len()
        ))
    })
}
