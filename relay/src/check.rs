//! `outbox-relay run --check-config --check-connections`: try each connection the
//! configuration names, once, and say which answer (without secrets).

use sqlx::Connection;

use crate::config::{RelayConfig, SinkConfig, redact_url};
use crate::error::{RelayError, Result};
use crate::sink::Sink;

/// Connect to PostgreSQL and to the broker once each; one line per connection that
/// answered, or the first failure with its cause and the setting to check.
pub async fn check_connections(config: &RelayConfig) -> Result<Vec<String>> {
    let mut answered = Vec::new();
    let options = crate::connect_options(&config.database)?;
    let shown = redact_url(&config.database.url);
    match tokio::time::timeout(
        config.database.connect_timeout,
        sqlx::PgConnection::connect_with(&options),
    )
    .await
    {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            answered.push(format!("PostgreSQL at {shown}: connected"));
        }
        Ok(Err(source)) => {
            return Err(RelayError::Database {
                operation: crate::connect_operation(&source),
                source,
            });
        }
        Err(_) => {
            return Err(RelayError::DatabaseTimeout {
                operation: "connecting to PostgreSQL (check database.url and the network)",
                timeout_ms: config.database.connect_timeout.as_millis() as u64,
            });
        }
    }
    match &config.sink {
        #[cfg(feature = "rabbitmq")]
        SinkConfig::RabbitMq(sink_config) => {
            let sink = crate::sink::rabbitmq::RabbitMqSink::connect(sink_config.clone()).await?;
            sink.close().await;
            answered.push(format!(
                "RabbitMQ at {}: connected",
                crate::sink::rabbitmq::mask_url(&sink_config.url)
            ));
        }
        #[cfg(feature = "kafka")]
        SinkConfig::Kafka(sink_config) => {
            let sink = crate::sink::kafka::KafkaSink::connect(sink_config.clone()).await?;
            sink.close().await;
            answered.push(format!("Kafka at {}: connected", sink_config.brokers));
        }
    }
    Ok(answered)
}
