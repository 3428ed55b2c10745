//! What teams write themselves: claim a batch with `for update skip locked`, publish
//! it with confirms, delete it, commit. A reference row for the relay's drains.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use lapin::Confirmation;
use lapin::options::BasicPublishOptions;

use crate::fixture::World;
use crate::limits::amqp_message;
use crate::{Ctx, Sink};

/// Drain a 1,000-key backlog to RabbitMQ with the hand-written loop; events/s.
pub(crate) async fn once(ctx: &Ctx) -> anyhow::Result<f64> {
    let world = World::create(ctx, Some(Sink::Rabbitmq)).await?;
    let result = drain(ctx, &world).await;
    world.cleanup(ctx).await;
    result
}

async fn drain(ctx: &Ctx, world: &World) -> anyhow::Result<f64> {
    world.load_backlog(ctx, 0, ctx.backlog, 1_000).await?;
    let outbox = world.schema.qualify("outbox");
    let claim = format!(
        "select sequence, payload::text from {outbox} \
         order by sequence limit $1 for update skip locked"
    );
    let delete = format!("delete from {outbox} where sequence = any($1)");
    let (connection, channel) = crate::limits::confirm_channel(ctx).await?;
    let mut conn = ctx.pool.acquire().await?;
    let bound = Duration::from_secs(ctx.drain_secs);
    let started = Instant::now();
    let mut settled = 0;
    while started.elapsed() < bound {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let rows: Vec<(i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(claim.as_str()))
            .bind(ctx.batch_size as i64)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            break;
        }
        let mut confirms = VecDeque::with_capacity(rows.len());
        for (sequence, payload) in &rows {
            // The row's payload as the body, with the relay's properties and headers.
            let (_, properties) = amqp_message(*sequence as usize, "");
            confirms.push_back(
                channel
                    .basic_publish(
                        world.destination.as_str().into(),
                        "bench.happened".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        payload.as_bytes(),
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            match confirm.await? {
                Confirmation::Ack(None) => {}
                other => anyhow::bail!("RabbitMQ did not confirm a message: {other:?}"),
            }
        }
        let sequences: Vec<i64> = rows.iter().map(|row| row.0).collect();
        sqlx::query(sqlx::AssertSqlSafe(delete.as_str()))
            .bind(&sequences)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        settled += rows.len();
    }
    let rate = settled as f64 / started.elapsed().as_secs_f64();
    let _ = connection.close(200, "done".into()).await;
    Ok(rate)
}
