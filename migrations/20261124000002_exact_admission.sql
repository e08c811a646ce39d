-- Admission, complete: tokens-per-minute windows, budget periods, per-model limits shared across
-- keys, idempotency keys, a log of rejections, and the release of what admission took moved into a
-- trigger so that it happens exactly once on ANY path to a terminal state (worker, cancel, expiry,
-- delete, or an operator's own UPDATE).

CREATE TYPE tollgate.budget_period AS ENUM ('daily', 'monthly');

ALTER TABLE tollgate.api_keys
    ADD COLUMN tpm_limit integer CHECK (tpm_limit > 0),
    -- NULL: the budget never resets.
    ADD COLUMN budget_period tollgate.budget_period;

-- Start of the budget period `spent_micro_usd` counts (NULL for keys whose budget never resets).
-- Admission starts a new period lazily, under the counter row's lock.
ALTER TABLE tollgate.key_counters ADD COLUMN period_start timestamptz;

-- Tokens counted in the window: estimated input at admission, corrected to the real usage
-- (input + output) when the job finishes.
ALTER TABLE tollgate.rate_windows ADD COLUMN tokens bigint NOT NULL DEFAULT 0;

-- Per-model windows, shared by every key, for models configured with rpm/tpm limits (protecting
-- the upstream's own limits).
CREATE TABLE tollgate.model_rate_windows (
    model         text        NOT NULL,
    window_start  timestamptz NOT NULL,
    requests      integer     NOT NULL DEFAULT 0 CHECK (requests >= 0),
    tokens        bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (model, window_start)
);

-- `charged_micro_usd`: what the key's spend was charged, the real cost capped at the reservation
-- so spend can never pass the budget; `cost_micro_usd` stays the real cost.
-- `idempotency_key` / `request_hash`: the client's Idempotency-Key and the SHA-256 of the body.
ALTER TABLE tollgate.jobs
    ADD COLUMN charged_micro_usd bigint,
    ADD COLUMN idempotency_key   text,
    ADD COLUMN request_hash      bytea;
CREATE UNIQUE INDEX jobs_idempotency ON tollgate.jobs (key_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Rejected requests, counted per minute, key and reason. They never become job rows.
-- `key_id` is the nil UUID when the request had no valid key.
CREATE TABLE tollgate.rejections (
    minute  timestamptz NOT NULL,
    key_id  uuid        NOT NULL,
    reason  text        NOT NULL,
    count   bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, key_id, reason)
);

-- Gives back what admission took when a job leaves `queued`/`in_progress` for a terminal state:
-- the in-flight slot, the budget reservation (replaced by the charged cost), and the TPM windows'
-- estimate, `estimated_input_tokens` (replaced by the real usage, when known). Runs once per job:
-- a terminal state is final.
CREATE FUNCTION tollgate.release_admission() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    charged bigint := least(coalesce(NEW.cost_micro_usd, 0), NEW.reserved_micro_usd);
    correction bigint;
BEGIN
    NEW.charged_micro_usd := charged;
    UPDATE tollgate.key_counters
       SET in_flight = in_flight - 1,
           reserved_micro_usd = reserved_micro_usd - NEW.reserved_micro_usd,
           spent_micro_usd = spent_micro_usd + charged
     WHERE key_id = NEW.key_id AND slot = NEW.counter_slot;
    IF NEW.input_tokens IS NOT NULL AND NEW.output_tokens IS NOT NULL THEN
        correction := NEW.input_tokens + NEW.output_tokens - NEW.estimated_input_tokens;
        UPDATE tollgate.rate_windows
           SET tokens = greatest(0, tokens + correction)
         WHERE key_id = NEW.key_id AND slot = NEW.counter_slot
           AND window_start = date_trunc('minute', NEW.created_at);
        UPDATE tollgate.model_rate_windows
           SET tokens = greatest(0, tokens + correction)
         WHERE model = NEW.model AND window_start = date_trunc('minute', NEW.created_at);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_release_admission
    BEFORE UPDATE OF status ON tollgate.jobs
    FOR EACH ROW
    WHEN (OLD.status IN ('queued', 'in_progress') AND NEW.status NOT IN ('queued', 'in_progress'))
    EXECUTE FUNCTION tollgate.release_admission();

-- A terminal state is final: moving a job back would take a slot nobody gave.
CREATE FUNCTION tollgate.refuse_reopen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'job % is % and cannot become %', NEW.id, OLD.status, NEW.status
        USING ERRCODE = 'check_violation';
END $$;

CREATE TRIGGER jobs_refuse_reopen
    BEFORE UPDATE OF status ON tollgate.jobs
    FOR EACH ROW
    WHEN (OLD.status NOT IN ('queued', 'in_progress') AND NEW.status IN ('queued', 'in_progress'))
    EXECUTE FUNCTION tollgate.refuse_reopen();

-- Deleting a job that has not finished gives back its slot and reservation.
CREATE FUNCTION tollgate.release_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tollgate.key_counters
       SET in_flight = in_flight - 1,
           reserved_micro_usd = reserved_micro_usd - OLD.reserved_micro_usd
     WHERE key_id = OLD.key_id AND slot = OLD.counter_slot;
    RETURN OLD;
END $$;

CREATE TRIGGER jobs_release_on_delete
    AFTER DELETE ON tollgate.jobs
    FOR EACH ROW
    WHEN (OLD.status IN ('queued', 'in_progress'))
    EXECUTE FUNCTION tollgate.release_on_delete();
