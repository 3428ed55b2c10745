//! What one measurement owns: its schema, its RabbitMQ exchange and durable queue or
//! its Kafka topic, its slot and publication; created fresh and removed afterwards.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use outbox_core::SchemaName;

use crate::daemon::Daemon;
use crate::{Ctx, Sink, Source};

/// Partitions of every Kafka topic the bench creates.
pub(crate) const KAFKA_PARTITIONS: i32 = 6;
/// Rows per statement when loading a backlog.
const LOAD_CHUNK_ROWS: usize = 50_000;
/// Longest wait for a relay to be ready (leases held, or the slot streaming).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// One measurement's names and objects.
pub(crate) struct World {
    pub(crate) schema: SchemaName,
    /// Exchange and queue, or topic.
    pub(crate) destination: String,
    pub(crate) slot: String,
    pub(crate) publication: String,
    pub(crate) sink: Option<Sink>,
    count_sql: String,
}

impl World {
    /// A fresh schema (migrated), and the sink's exchange + durable queue or topic.
    pub(crate) async fn create(ctx: &Ctx, sink: Option<Sink>) -> anyhow::Result<World> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("bench_{}", &id[..12]);
        let schema = SchemaName::new(name.clone())?;
        outbox_core::migrate(&ctx.pool, &schema)
            .await
            .context("creating the bench schema")?;
        let world = World {
            count_sql: format!("select count(*) from {}", schema.qualify("outbox")),
            schema,
            destination: format!("bench-{}", &id[..12]),
            slot: format!("{name}_slot"),
            publication: format!("{name}_pub"),
            sink,
        };
        let declared = match sink {
            Some(Sink::Rabbitmq) => declare_durable_queue(&ctx.amqp_url, &world.destination).await,
            Some(Sink::Kafka) => create_topic(&ctx.kafka_brokers, &world.destination).await,
            None => Ok(()),
        };
        if let Err(error) = declared {
            world.cleanup(ctx).await;
            return Err(error);
        }
        Ok(world)
    }

    /// `events` rows over `keys` keys (`bench:<i % keys>`), payload `{"i": i, "pad": "x…"}`,
    /// inserted by PostgreSQL itself in chunks: the backlog is ready faster than the
    /// writer could make it, and the rows are those `enqueue` writes.
    pub(crate) async fn load_backlog(
        &self,
        ctx: &Ctx,
        first: usize,
        events: usize,
        keys: usize,
    ) -> anyhow::Result<()> {
        let sql = format!(
            "insert into {} (event_id, aggregate_type, aggregate_id, event_type, partition_key, payload, created_at) \
             select gen_random_uuid(), 'bench', (g % $3)::text, 'bench.happened', 'bench:' || (g % $3), \
                    jsonb_build_object('i', g, 'pad', repeat('x', $4)), now() \
             from generate_series($1::int8, $2::int8) as g",
            self.schema.qualify("outbox")
        );
        let end = first + events;
        let mut start = first;
        while start < end {
            let last = (start + LOAD_CHUNK_ROWS).min(end) - 1;
            sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(start as i64)
                .bind(last as i64)
                .bind(keys as i64)
                .bind(ctx.payload_bytes as i32)
                .execute(&ctx.pool)
                .await
                .context("loading the backlog")?;
            start = last + 1;
        }
        Ok(())
    }

    pub(crate) async fn outbox_rows(&self, ctx: &Ctx) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar(sqlx::AssertSqlSafe(self.count_sql.as_str()))
                .fetch_one(&ctx.pool)
                .await?,
        )
    }

    /// Daemon settings for `source` → this world's sink, relay defaults otherwise.
    pub(crate) fn relay_env(&self, ctx: &Ctx, source: Source) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE__URL".into(), ctx.database_url.clone()),
            ("DATABASE__SCHEMA".into(), self.schema.to_string()),
            ("SOURCE".into(), source.name().into()),
        ];
        if source == Source::Wal {
            env.push(("WAL__SLOT".into(), self.slot.clone()));
            env.push(("WAL__PUBLICATION".into(), self.publication.clone()));
        }
        match self.sink {
            Some(Sink::Rabbitmq) | None => {
                env.push(("SINK".into(), "rabbitmq".into()));
                env.push(("RABBITMQ__URL".into(), ctx.amqp_url.clone()));
                env.push(("RABBITMQ__EXCHANGE".into(), self.destination.clone()));
            }
            Some(Sink::Kafka) => {
                env.push(("SINK".into(), "kafka".into()));
                env.push(("KAFKA__BROKERS".into(), ctx.kafka_brokers.clone()));
                env.push(("KAFKA__TOPIC".into(), self.destination.clone()));
            }
        }
        // A setting of the other sink's section would make the daemon refuse its config.
        let other_sink = match self.sink {
            Some(Sink::Rabbitmq) | None => "KAFKA__",
            Some(Sink::Kafka) => "RABBITMQ__",
        };
        env.extend(
            ctx.relay_settings
                .iter()
                .filter(|(key, _)| !key.starts_with(other_sink))
                .cloned(),
        );
        env
    }

    /// Wait until the WAL relay streams from its slot, or the polling relay holds leases.
    pub(crate) async fn wait_ready(
        &self,
        ctx: &Ctx,
        source: Source,
        daemon: &mut Daemon,
    ) -> anyhow::Result<Duration> {
        let leases_sql = format!(
            "select count(*) from {} where name like 'partition:%' and owner is not null \
             and expires_at > now()",
            self.schema.qualify("relay_lease")
        );
        let started = Instant::now();
        loop {
            let ready = match source {
                Source::Wal => outbox_examples::slot_streaming(&ctx.pool, &self.slot).await?,
                Source::Polling => {
                    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(leases_sql.as_str()))
                        .fetch_one(&ctx.pool)
                        .await?
                        > 0
                }
            };
            if ready {
                return Ok(started.elapsed());
            }
            if !daemon.running() {
                return Err(daemon.ended_early("before it was ready"));
            }
            anyhow::ensure!(
                started.elapsed() < READY_TIMEOUT,
                "the relay was not ready within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drop the slot (once released), the publication, the schema and the broker objects;
    /// best effort, failures are printed.
    pub(crate) async fn cleanup(&self, ctx: &Ctx) {
        if let Err(error) = outbox_examples::drop_slot(&ctx.pool, &self.slot).await {
            eprintln!("bench: could not drop slot {}: {error:#}", self.slot);
        }
        for sql in [
            format!("drop publication if exists \"{}\"", self.publication),
            format!("drop schema if exists {} cascade", self.schema.as_str()),
        ] {
            if let Err(error) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.as_str()))
                .execute(&ctx.pool)
                .await
            {
                eprintln!("bench: {sql}: {error}");
            }
        }
        match self.sink {
            Some(Sink::Rabbitmq) => {
                if let Err(error) =
                    outbox_examples::delete_queue_and_exchange(&ctx.amqp_url, &self.destination)
                        .await
                {
                    eprintln!(
                        "bench: could not delete queue {}: {error:#}",
                        self.destination
                    );
                }
            }
            Some(Sink::Kafka) => {
                delete_topics(&ctx.kafka_brokers, &[self.destination.as_str()]).await;
            }
            None => {}
        }
    }
}

/// A durable topic exchange `name` and a durable queue `name` bound to it by `#`.
pub(crate) async fn declare_durable_queue(amqp_url: &str, name: &str) -> anyhow::Result<()> {
    let connection = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ (set AMQP_URL)")?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            name.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            name.into(),
            name.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = connection.close(200, "declared".into()).await;
    Ok(())
}

/// Create `topic` with [`KAFKA_PARTITIONS`] partitions (the broker does not auto-create).
pub(crate) async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(
                topic,
                KAFKA_PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .context("creating the Kafka topic (set KAFKA_BROKERS)")?;
    for result in results {
        if let Err((name, code)) = result {
            anyhow::bail!("creating topic {name}: {code}");
        }
    }
    // Let metadata catch up before the first produce.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// Delete `topics`; best effort, failures are printed.
pub(crate) async fn delete_topics(brokers: &str, topics: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: Result<AdminClient<rdkafka::client::DefaultClientContext>, _> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create();
    match admin {
        Ok(admin) => {
            if let Err(error) = admin
                .delete_topics(
                    topics,
                    &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
                )
                .await
            {
                eprintln!("bench: could not delete topics {topics:?}: {error}");
            }
        }
        Err(error) => eprintln!("bench: could not delete topics {topics:?}: {error}"),
    }
}

/// Counts the messages that reached a world's queue or topic (broker-side), so a drain
/// is timed by what the broker took, at the granularity of one message rather than of
/// one settled batch.
pub(crate) enum BrokerCount {
    Rabbitmq {
        connection: Box<lapin::Connection>,
        channel: Box<lapin::Channel>,
        queue: String,
    },
    Kafka {
        consumer: std::sync::Arc<rdkafka::consumer::BaseConsumer>,
        topic: String,
    },
}

impl BrokerCount {
    pub(crate) async fn open(ctx: &Ctx, world: &World) -> anyhow::Result<BrokerCount> {
        match world.sink {
            Some(Sink::Kafka) => {
                let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
                    .set("bootstrap.servers", ctx.kafka_brokers.as_str())
                    .set("group.id", format!("{}-count", world.destination))
                    .create()
                    .context("creating the Kafka watermark reader")?;
                Ok(BrokerCount::Kafka {
                    consumer: std::sync::Arc::new(consumer),
                    topic: world.destination.clone(),
                })
            }
            Some(Sink::Rabbitmq) | None => {
                let connection = lapin::Connection::connect(
                    &ctx.amqp_url,
                    lapin::ConnectionProperties::default(),
                )
                .await
                .context("connecting to RabbitMQ (set AMQP_URL)")?;
                let channel = connection.create_channel().await?;
                Ok(BrokerCount::Rabbitmq {
                    connection: Box::new(connection),
                    channel: Box::new(channel),
                    queue: world.destination.clone(),
                })
            }
        }
    }

    /// Messages in the queue (nobody consumes it), or the sum of the topic's high watermarks.
    pub(crate) async fn count(&self) -> anyhow::Result<u64> {
        match self {
            BrokerCount::Rabbitmq { channel, queue, .. } => {
                let queue = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            durable: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .context("counting the queue")?;
                Ok(u64::from(queue.message_count()))
            }
            BrokerCount::Kafka { consumer, topic } => {
                let (consumer, topic) = (consumer.clone(), topic.clone());
                tokio::task::spawn_blocking(move || {
                    use rdkafka::consumer::Consumer as _;
                    let mut total = 0_u64;
                    for partition in 0..KAFKA_PARTITIONS {
                        let (_, high) = consumer
                            .fetch_watermarks(&topic, partition, Duration::from_secs(5))
                            .context("reading the topic's watermarks")?;
                        total += u64::try_from(high).unwrap_or(0);
                    }
                    anyhow::Ok(total)
                })
                .await
                .context("the watermark reader panicked")?
            }
        }
    }

    pub(crate) async fn close(self) {
        if let BrokerCount::Rabbitmq { connection, .. } = self {
            let _ = connection.close(200, "counted".into()).await;
        }
    }
}
