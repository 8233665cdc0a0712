-- Issue 15: notification.status.events. The outbox carries a fourth kind of message, a
-- notification's overall status when it changes (src/status_events.rs).
ALTER TABLE outbox DROP CONSTRAINT outbox_kind_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check
    CHECK (kind IN ('delivery_event', 'dead_letter', 'broadcast_event', 'status_event'));
