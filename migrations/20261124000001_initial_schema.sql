-- tollgate's initial schema: API keys, their admission counters, jobs (the poll rows), the streamed
-- output of jobs, and the outbox that guarantees every committed job is published to RabbitMQ.
-- Everything lives in the `tollgate` schema so it can sit beside other applications' tables; this
-- schema is a documented interface that operators query directly (see README "SQL on job state").

CREATE SCHEMA IF NOT EXISTS tollgate;

-- The lifecycle of a job, as the OpenAI Responses API names it.
CREATE TYPE tollgate.job_status AS ENUM (
    'queued', 'in_progress', 'completed', 'failed', 'cancelled', 'incomplete'
);

-- API keys. Only the SHA-256 of a key is stored; `key_prefix` is enough to recognise a key in a
-- listing. Every limit is optional (NULL = unlimited).
CREATE TABLE tollgate.api_keys (
    id                uuid PRIMARY KEY,
    name              text        NOT NULL,
    key_hash          bytea       NOT NULL UNIQUE,
    key_prefix        text        NOT NULL,
    rpm_limit         integer     CHECK (rpm_limit > 0),
    max_in_flight     integer     CHECK (max_in_flight > 0),
    budget_micro_usd  bigint      CHECK (budget_micro_usd >= 0),
    allowed_models    text[],
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz,
    revoked_at        timestamptz
);

-- Live admission state of a key. Admission locks these rows, so every admission of one key is
-- serialised and exact. A key may own several slots (`slot` > 0) sharing its limits between them so
-- hot keys can spread their lock; readers always SUM over a key's slots.
CREATE TABLE tollgate.key_counters (
    key_id              uuid     NOT NULL REFERENCES tollgate.api_keys (id) ON DELETE CASCADE,
    slot                smallint NOT NULL DEFAULT 0,
    in_flight           integer  NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    reserved_micro_usd  bigint   NOT NULL DEFAULT 0 CHECK (reserved_micro_usd >= 0),
    spent_micro_usd     bigint   NOT NULL DEFAULT 0 CHECK (spent_micro_usd >= 0),
    PRIMARY KEY (key_id, slot)
);

-- Requests admitted per key per fixed one-minute window (the requests-per-minute limit). Only
-- admission writes here; finishing a job never touches it.
CREATE TABLE tollgate.rate_windows (
    key_id        uuid        NOT NULL REFERENCES tollgate.api_keys (id) ON DELETE CASCADE,
    slot          smallint    NOT NULL DEFAULT 0,
    window_start  timestamptz NOT NULL,
    requests      integer     NOT NULL DEFAULT 0 CHECK (requests >= 0),
    PRIMARY KEY (key_id, slot, window_start)
);

-- Jobs: one row per admitted request, the row clients poll. Money is integer micro-dollars.
-- `reserved_micro_usd` and `counter_slot` say what admission took, so that finishing gives back
-- exactly that, once.
CREATE TABLE tollgate.jobs (
    id                  uuid                NOT NULL PRIMARY KEY,
    key_id              uuid                NOT NULL REFERENCES tollgate.api_keys (id),
    model               text                NOT NULL,
    status              tollgate.job_status NOT NULL DEFAULT 'queued',
    request             jsonb               NOT NULL,
    output_text         text                NOT NULL DEFAULT '',
    input_tokens        integer,
    output_tokens       integer,
    estimated_input_tokens integer          NOT NULL,
    reserved_micro_usd  bigint              NOT NULL DEFAULT 0,
    counter_slot        smallint            NOT NULL DEFAULT 0,
    cost_micro_usd      bigint,
    error               jsonb,
    attempt             integer             NOT NULL DEFAULT 0,
    lease_until         timestamptz,
    created_at          timestamptz         NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    updated_at          timestamptz         NOT NULL DEFAULT now()
);
CREATE INDEX jobs_key_created ON tollgate.jobs (key_id, created_at DESC);
CREATE INDEX jobs_unfinished ON tollgate.jobs (status, created_at) WHERE status IN ('queued', 'in_progress');

-- The streamed output of a job: one row per flushed batch of deltas, numbered within the attempt
-- (`seq_first`..`seq_last` are delta indexes), so a retried attempt never mixes with an earlier one.
CREATE TABLE tollgate.job_events (
    job_id      uuid        NOT NULL REFERENCES tollgate.jobs (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    seq_first   integer     NOT NULL,
    seq_last    integer     NOT NULL,
    deltas      text[]      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt, seq_first),
    CHECK (seq_last >= seq_first)
);

-- The transactional outbox: written in the admission transaction beside the job, marked sent once
-- RabbitMQ confirmed the message. A relay republishes rows left unsent.
CREATE TABLE tollgate.outbox (
    id          bigserial   PRIMARY KEY,
    job_id      uuid        NOT NULL REFERENCES tollgate.jobs (id) ON DELETE CASCADE,
    payload     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz,
    publish_attempts integer NOT NULL DEFAULT 0
);
CREATE INDEX outbox_unsent ON tollgate.outbox (id) WHERE sent_at IS NULL;
