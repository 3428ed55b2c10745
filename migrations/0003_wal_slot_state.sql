-- The lifecycle of each WAL-source replication slot, so that every step of
-- creating, draining and recovering a slot survives a crash of the relay.
-- Written by relay/src/source/wal.rs; its module doc has the state machine.
--
-- state:
--   creating    the relay is about to create the slot (or did, and crashed
--               before recording it): a slot found now is ours, adopted.
--   draining    the slot exists and its start is recorded; rows with
--               drain_after < sequence <= drain_upto committed before the slot
--               started and are published from the table before the stream.
--   streaming   the drain is done: the stream carries everything.
--   recovering  the slot was found lost; the old one is being dropped before
--               a new one is created (then: creating).
-- The confirmed position stays in relay_lease ('wal-confirmed:<slot>').
create table relay_wal_slot (
    slot        text primary key,
    state       text not null check (state in ('creating', 'draining', 'streaming', 'recovering')),
    -- Highest sequence of the drain whose rows are settled (deleted): the drain resumes after it.
    drain_after bigint not null default 0,
    -- The outbox's high-water mark when the slot started: the drain ends there.
    drain_upto  bigint not null default 0,
    changed_at  timestamptz not null default now()
);
