-- Lifecycle events for consumers outside tollgate (billing, audit, notifications, webhooks).
--
-- Every transition of a job — admitted (`queued`), a new attempt started (`in_progress`), put back
-- (`queued`), finished (`completed`, `failed`, `cancelled`, `incomplete`), `deleted` — writes one
-- row of `tollgate.event_outbox` in the transaction that makes it, by trigger. A trigger, not the
-- Rust paths, so that every path writes its events: admission, the worker's grouped statements,
-- cancel, expiry, rescue, client delete, retention, an operator's own UPDATE; and a transition
-- that rolls back takes its event with it. The event relay (`src/queue/outbox.rs`) publishes the
-- rows, in id order, to the topic exchange `tollgate.events`.
--
-- This outbox is the jobs outbox's sibling, not the same table: an event must outlive its job (the
-- `deleted` event; retention), and its rows are published promptly and in order by one relay at a
-- time, where job rows wait a grace period for the front's own publish and any relay may take them.

-- The number of the job's latest event: 1 is its `queued` event at admission. Each event row
-- carries it as `seq`, so consumers can put one job's events in order and see gaps.
ALTER TABLE tollgate.jobs ADD COLUMN event_seq integer NOT NULL DEFAULT 1;

-- One row per event waiting to be published, with the job's state right after the transition
-- (never the prompt or the output). The relay deletes a row once RabbitMQ confirmed its event:
-- the table holds only what waits, so it stays small, needs no index but its key, and costs no
-- second write per event to mark it sent. No foreign key to the job: a `deleted` event outlives
-- it.
CREATE TABLE tollgate.event_outbox (
    id                  bigserial   PRIMARY KEY,
    -- The event's id, unique per event: the consumers' dedup key.
    event_id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    job_id              uuid        NOT NULL,
    key_id              uuid        NOT NULL,
    model               text        NOT NULL,
    -- A `tollgate.job_status`, or `deleted`.
    status              text        NOT NULL,
    seq                 integer     NOT NULL,
    attempt             integer     NOT NULL,
    input_tokens        integer,
    output_tokens       integer,
    usage_estimated     boolean,
    reserved_micro_usd  bigint      NOT NULL,
    cost_micro_usd      bigint,
    charged_micro_usd   bigint,
    error               jsonb,
    incomplete_reason   text,
    job_created_at      timestamptz NOT NULL,
    started_at          timestamptz,
    finished_at         timestamptz,
    occurred_at         timestamptz NOT NULL DEFAULT now(),
    -- Publishes RabbitMQ did not confirm.
    publish_attempts    integer     NOT NULL DEFAULT 0
);

-- A transition that makes an event: a new status, or a new attempt taking over a job whose worker
-- is gone (`in_progress` to `in_progress`).
CREATE FUNCTION tollgate.next_event_seq() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.event_seq := OLD.event_seq + 1;
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_next_event_seq
    BEFORE UPDATE OF status, attempt ON tollgate.jobs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR (NEW.status = 'in_progress' AND OLD.attempt IS DISTINCT FROM NEW.attempt))
    EXECUTE FUNCTION tollgate.next_event_seq();

-- Writes the event row of a transition. AFTER triggers, so the row holds what the BEFORE triggers
-- settled (the charge, from `release_admission`).
CREATE FUNCTION tollgate.record_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO tollgate.event_outbox
            (job_id, key_id, model, status, seq, attempt, input_tokens, output_tokens,
             usage_estimated, reserved_micro_usd, cost_micro_usd, charged_micro_usd, error,
             incomplete_reason, job_created_at, started_at, finished_at)
        VALUES
            (OLD.id, OLD.key_id, OLD.model, 'deleted', OLD.event_seq + 1, OLD.attempt,
             OLD.input_tokens, OLD.output_tokens, OLD.usage_estimated, OLD.reserved_micro_usd,
             OLD.cost_micro_usd, OLD.charged_micro_usd, OLD.error, OLD.incomplete_reason,
             OLD.created_at, OLD.started_at, OLD.finished_at);
        RETURN NULL;
    END IF;
    INSERT INTO tollgate.event_outbox
        (job_id, key_id, model, status, seq, attempt, input_tokens, output_tokens,
         usage_estimated, reserved_micro_usd, cost_micro_usd, charged_micro_usd, error,
         incomplete_reason, job_created_at, started_at, finished_at)
    VALUES
        (NEW.id, NEW.key_id, NEW.model, NEW.status::text, NEW.event_seq, NEW.attempt,
         NEW.input_tokens, NEW.output_tokens, NEW.usage_estimated, NEW.reserved_micro_usd,
         NEW.cost_micro_usd, NEW.charged_micro_usd, NEW.error, NEW.incomplete_reason,
         NEW.created_at, NEW.started_at, NEW.finished_at);
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_record_event_insert
    AFTER INSERT ON tollgate.jobs
    FOR EACH ROW EXECUTE FUNCTION tollgate.record_job_event();

CREATE TRIGGER jobs_record_event_update
    AFTER UPDATE OF status, attempt ON tollgate.jobs
    FOR EACH ROW
    WHEN (OLD.event_seq IS DISTINCT FROM NEW.event_seq)
    EXECUTE FUNCTION tollgate.record_job_event();

CREATE TRIGGER jobs_record_event_delete
    AFTER DELETE ON tollgate.jobs
    FOR EACH ROW EXECUTE FUNCTION tollgate.record_job_event();

-- What waits to be published, and how late the oldest is: an operator's first look when a
-- consumer says events stopped.
CREATE VIEW tollgate.event_backlog AS
SELECT count(*) AS unsent,
       min(occurred_at) AS oldest,
       coalesce(extract(epoch FROM now() - min(occurred_at)), 0)::float8 AS oldest_age_seconds,
       coalesce(max(publish_attempts), 0) AS most_publish_attempts
  FROM tollgate.event_outbox;
