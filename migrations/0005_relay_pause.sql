-- Publishing paused by an operator (outbox-relay pause), per instance group: every
-- relay of the group stops taking new events within a second and resumes when the
-- row is deleted (outbox-relay resume). Events keep accumulating in the outbox.
create table relay_pause (
    instance_group text primary key check (instance_group <> ''),
    paused_at      timestamptz not null default now(),
    paused_by      text not null,
    reason         text not null default ''
);
