-- Webhooks: endpoints per key, and a record of every delivery attempt.
--
-- Webhooks are one consumer of the lifecycle events (`src/webhooks/`): a worker consumes the
-- terminal events from its own queue and POSTs OpenAI's `response.*` webhook to each endpoint of
-- the job's key that asked for that type, signed by the Standard Webhooks specification.

CREATE TABLE tollgate.webhook_endpoints (
    id           uuid        PRIMARY KEY,
    key_id       uuid        NOT NULL REFERENCES tollgate.api_keys (id) ON DELETE CASCADE,
    url          text        NOT NULL,
    -- The event types it receives (`response.completed`…); NULL: all of them.
    event_types  text[],
    -- The signing secret, `whsec_…`. Kept as is, not hashed: every delivery is signed with it.
    secret       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- A removed endpoint is disabled, not deleted, so its deliveries stay on record.
    disabled_at  timestamptz
);
-- One live endpoint per key and URL.
CREATE UNIQUE INDEX webhook_endpoints_live ON tollgate.webhook_endpoints (key_id, url)
    WHERE disabled_at IS NULL;

-- Workers keep the live endpoints in memory; a change is announced so they re-read them at once
-- (they also re-read them every `webhooks.refresh_ms`).
CREATE FUNCTION tollgate.notify_webhook_endpoints() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_webhook_endpoints', '');
    RETURN NULL;
END $$;

CREATE TRIGGER webhook_endpoints_notify
    AFTER INSERT OR UPDATE OR DELETE ON tollgate.webhook_endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate.notify_webhook_endpoints();

-- One row per attempt to deliver one event to one endpoint (a replay too).
-- `outcome`: delivered (a 2xx answer); retrying (failed, a retry is scheduled); dead (failed,
-- and it was the last retry: the delivery went to the dead-letter queue); failed (a replay that
-- failed: replays are not retried).
CREATE TABLE tollgate.webhook_deliveries (
    id            bigserial   PRIMARY KEY,
    endpoint_id   uuid        NOT NULL REFERENCES tollgate.webhook_endpoints (id) ON DELETE CASCADE,
    -- `evt_…`: the lifecycle event's id, sent as `webhook-id`, the same on every attempt.
    event_id      text        NOT NULL,
    event_type    text        NOT NULL,
    job_id        uuid        NOT NULL,
    attempt       integer     NOT NULL CHECK (attempt >= 1),
    outcome       text        NOT NULL CHECK (outcome IN ('delivered', 'retrying', 'dead', 'failed')),
    status_code   integer,
    latency_ms    integer,
    error         text,
    replay        boolean     NOT NULL DEFAULT false,
    -- The body sent, byte for byte the same on every attempt.
    payload       text        NOT NULL,
    attempted_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_event ON tollgate.webhook_deliveries (event_id, endpoint_id);
CREATE INDEX webhook_deliveries_endpoint ON tollgate.webhook_deliveries (endpoint_id, attempted_at DESC);
CREATE INDEX webhook_deliveries_attempted ON tollgate.webhook_deliveries (attempted_at);

-- Every attempt, newest first, with its key and endpoint: what an operator reads when a customer
-- says a webhook never came.
CREATE VIEW tollgate.webhook_delivery_log AS
SELECT d.id, d.attempted_at, e.key_id, k.name AS key_name, e.id AS endpoint_id, e.url,
       d.event_type, d.event_id, 'resp_' || replace(d.job_id::text, '-', '') AS response_id,
       d.attempt, d.replay, d.outcome, d.status_code, d.latency_ms, d.error
  FROM tollgate.webhook_deliveries d
  JOIN tollgate.webhook_endpoints e ON e.id = d.endpoint_id
  JOIN tollgate.api_keys k ON k.id = e.key_id
 ORDER BY d.attempted_at DESC, d.id DESC;
