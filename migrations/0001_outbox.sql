-- outbox-relay schema, version 1.
--
-- Names are unqualified on purpose: outbox_core::migrate() runs this file with
-- search_path set to the configured schema (default "outbox"), so one database can
-- hold several independent outboxes. Do not add schema prefixes here.

-- One row per event, written in the same transaction as the business change.
-- Rows are read in `sequence` order. Per partition key that order equals commit
-- order as long as writers follow the rule in outbox_core::writer (lock the
-- aggregate, or use KeyOrdering::AdvisoryLock, before enqueueing).
create table outbox (
    sequence         bigint generated always as identity primary key,
    event_id         uuid not null,
    aggregate_type   text not null check (aggregate_type <> ''),
    aggregate_id     text not null check (aggregate_id <> ''),
    event_type       text not null check (event_type <> ''),
    partition_key    text not null check (partition_key <> ''),
    -- Stable hash of the partition key: relays split the work into partitions by it.
    key_hash         integer not null generated always as (hashtext(partition_key)) stored,
    -- Optional override of the configured route (exchange or topic).
    destination      text,
    payload          jsonb not null,
    headers          jsonb not null default '{}'::jsonb check (jsonb_typeof(headers) = 'object'),
    created_at       timestamptz not null,
    -- Relay bookkeeping: failures of this event itself (never broker outages).
    attempts         integer not null default 0,
    last_error       text,
    first_failed_at  timestamptz,
    last_failed_at   timestamptz,
    -- Earliest time a relay may try this event again (backoff after a failure).
    available_at     timestamptz not null default now(),
    -- Claim held by a relay instance; it expires so a crashed relay loses nothing.
    lease_owner      text,
    lease_token      bigint,
    lease_expires_at timestamptz,
    -- Set when the broker confirmed the event and the relay keeps published rows.
    published_at     timestamptz,
    constraint outbox_event_id_key unique (event_id)
);

-- Unpublished rows in sequence order: what every relay scan reads.
create index outbox_pending_idx on outbox (sequence) where published_at is null;
-- Retention of published rows.
create index outbox_published_at_idx on outbox (published_at) where published_at is not null;

-- Wake relays without polling delay: one notification per inserting statement,
-- delivered at commit (never for rolled-back transactions). The channel is
-- "<schema>.outbox" so relays of different schemas do not wake each other.
create function outbox_notify_insert() returns trigger
language plpgsql as $$
begin
    perform pg_notify(tg_table_schema || '.outbox', '');
    return null;
end
$$;

create trigger outbox_notify_insert
    after insert on outbox
    for each statement
    execute function outbox_notify_insert();

-- Events that could never be published, with the reason. Operators inspect,
-- retry or purge them (outbox-relay dead-letters ...).
create table outbox_dead_letter (
    sequence         bigint primary key,
    event_id         uuid not null,
    aggregate_type   text not null,
    aggregate_id     text not null,
    event_type       text not null,
    partition_key    text not null,
    destination      text,
    payload          jsonb not null,
    headers          jsonb not null,
    created_at       timestamptz not null,
    attempts         integer not null,
    last_error       text not null,
    first_failed_at  timestamptz not null,
    last_failed_at   timestamptz not null,
    dead_lettered_at timestamptz not null default now(),
    constraint outbox_dead_letter_event_id_key unique (event_id)
);

create index outbox_dead_letter_event_type_idx on outbox_dead_letter (event_type, dead_lettered_at);
create index outbox_dead_letter_aggregate_idx on outbox_dead_letter (aggregate_type, aggregate_id);

-- Consumer-side deduplication: one row per (consumer, message id) processed.
-- Written in the consumer's own transaction together with the handler's effects.
create table inbox (
    consumer    text not null check (consumer <> ''),
    message_id  text not null check (message_id <> ''),
    received_at timestamptz not null default now(),
    primary key (consumer, message_id)
);

-- Retention deletes ids older than the dedup window.
create index inbox_received_at_idx on inbox (received_at);

-- Named leases held by relay instances: work partitions ("partition:7") and the
-- WAL leader ("wal:<slot>"). The fencing token grows on every change of owner, so
-- an instance that lost its lease cannot settle work it no longer owns.
create table relay_lease (
    name          text primary key,
    owner         text,
    fencing_token bigint not null default 0,
    expires_at    timestamptz not null default '-infinity'
);
