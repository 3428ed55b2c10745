-- NOTIFY serialises committing transactions on PostgreSQL's notification queue (one
-- global lock at commit): with the per-statement trigger, 16 writers committed about
-- half as many transactions per second as without it. Relays poll adaptively instead
-- (every few milliseconds while events flow, backing off to polling.poll_interval_ms
-- when idle), so the trigger is no longer installed. The function stays: a service
-- that prefers instant wake-ups over commit throughput can opt in with
--   create trigger outbox_notify_insert after insert on <schema>.outbox
--       for each statement execute function <schema>.outbox_notify_insert();
-- and relays, which always LISTEN on "<schema>.outbox", wake at once again.
drop trigger if exists outbox_notify_insert on outbox;
