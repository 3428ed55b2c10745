-- The polling relay skips every later event of a key while an earlier one waits
-- for its retry (available_at in the future). Only events that failed before
-- (attempts > 0) can wait, so this index stays tiny.
create index outbox_waiting_key_idx on outbox (partition_key, sequence)
    where published_at is null and attempts > 0;
