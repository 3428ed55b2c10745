//! Where an event goes: exchange and routing key (RabbitMQ) or topic and key (Kafka),
//! from templates over the event's fields.

use crate::event::OutboxEvent;

/// The destination of one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// RabbitMQ exchange or Kafka topic.
    pub destination: String,
    /// RabbitMQ routing key or Kafka message key.
    pub key: String,
}

/// Placeholders a template may use.
pub const PLACEHOLDERS: [&str; 4] = [
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "partition_key",
];

/// A string with `{placeholder}`s, checked when the configuration is loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Field),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    AggregateType,
    AggregateId,
    EventType,
    PartitionKey,
}

/// A template that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid template {template:?}: {reason}")]
pub struct TemplateError {
    /// The template text.
    pub template: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

impl Template {
    /// Parse `{aggregate_type}.{event_type}`-style text.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let error = |reason: String| TemplateError {
            template: text.to_owned(),
            reason,
        };
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| error("a '{' is not closed".into()))?
                + open;
            let name = &rest[open + 1..close];
            let field = match name {
                "aggregate_type" => Field::AggregateType,
                "aggregate_id" => Field::AggregateId,
                "event_type" => Field::EventType,
                "partition_key" => Field::PartitionKey,
                other => {
                    return Err(error(format!(
                        "unknown placeholder {{{other}}}; use one of {{{}}}",
                        PLACEHOLDERS.join("}, {")
                    )));
                }
            };
            parts.push(Part::Field(field));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(error("a '}' has no matching '{'".into()));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// Fill the template from an event.
    pub fn render(&self, event: &OutboxEvent) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Field(Field::AggregateType) => out.push_str(&event.aggregate_type),
                Part::Field(Field::AggregateId) => out.push_str(&event.aggregate_id),
                Part::Field(Field::EventType) => out.push_str(&event.event_type),
                Part::Field(Field::PartitionKey) => out.push_str(&event.partition_key),
            }
        }
        out
    }
}

/// Turns events into routes: the destination template (unless the event overrides it) and the key template.
#[derive(Clone, Debug)]
pub struct Router {
    destination: Template,
    key: Template,
}

impl Router {
    /// A router from a destination and a key template.
    pub fn new(destination: Template, key: Template) -> Self {
        Router { destination, key }
    }

    /// The route of one event.
    pub fn route(&self, event: &OutboxEvent) -> Route {
        Route {
            destination: event
                .destination
                .clone()
                .unwrap_or_else(|| self.destination.render(event)),
            key: self.key.render(event),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> OutboxEvent {
        OutboxEvent {
            sequence: 1,
            event_id: outbox_core::EventId::new(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            event_type: "order.placed".into(),
            partition_key: "order:42".into(),
            destination: None,
            payload: b"{}".to_vec(),
            headers: Default::default(),
            created_at: chrono::Utc::now(),
            attempts: 0,
        }
    }

    #[test]
    fn templates_render_fields() {
        let t = Template::parse("events.{aggregate_type}.{event_type}").unwrap();
        assert_eq!(t.render(&event()), "events.order.order.placed");
        assert_eq!(Template::parse("fixed").unwrap().render(&event()), "fixed");
        assert_eq!(
            Template::parse("{partition_key}").unwrap().render(&event()),
            "order:42"
        );
    }

    #[test]
    fn bad_templates_are_refused_with_the_allowed_names() {
        let err = Template::parse("{aggregate}").unwrap_err();
        assert!(err.reason.contains("{aggregate_type}"), "{err}");
        assert!(Template::parse("{event_type").is_err());
        assert!(Template::parse("a}b").is_err());
    }

    #[test]
    fn event_destination_overrides_the_template() {
        let router = Router::new(
            Template::parse("default").unwrap(),
            Template::parse("{event_type}").unwrap(),
        );
        let mut e = event();
        assert_eq!(router.route(&e).destination, "default");
        e.destination = Some("special".into());
        assert_eq!(
            router.route(&e),
            Route {
                destination: "special".into(),
                key: "order.placed".into()
            }
        );
    }
}
