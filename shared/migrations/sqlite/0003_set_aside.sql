-- A conversation whose stored object cannot be read (not a JSON array) is set aside: its staged
-- events are kept, it is never flushed (so the object is never overwritten) until an operator
-- re-queues it. NULL: not set aside.
ALTER TABLE conversations ADD COLUMN set_aside_reason TEXT;
