-- Admission in one round trip: `tollgate.admit` does in one statement, on an autocommit
-- connection, what the admission transaction did in five round trips (BEGIN, lock, count,
-- insert, COMMIT). The checks and their order are unchanged (src/admission/mod.rs tells the
-- whole story); only where they run moved.
--
-- The key's counter row is locked first, so every admission of the key is serialised and each
-- statement below, taking a fresh snapshot (the function is VOLATILE, READ COMMITTED), sees
-- every admission committed before it. Counting in the windows and rolling the budget period
-- over happen inside a block with an exception handler: a rejection raises `TGREJ`, which undoes
-- every write of the block (a subtransaction), and the function returns the rejection with the
-- figures it saw. A rejected request therefore leaves nothing behind, as before.
--
-- `outcome` is one of: admitted, replayed, idempotency_mismatch, invalid_key, key_rpm, key_tpm,
-- model_rpm, model_tpm, in_flight, budget.
CREATE FUNCTION tollgate.admit(
    p_key_id                 uuid,
    p_tokens                 bigint,   -- estimated input tokens, counted in the tpm windows
    p_reserve                bigint,   -- the worst-case cost, micro-USD
    p_model                  text,
    p_model_rpm              bigint,   -- the model's own limits (NULL: none)
    p_model_tpm              bigint,
    p_idempotency_key        text,
    p_request_hash           bytea,
    p_job_id                 uuid,
    p_request                jsonb,
    p_history                jsonb,
    p_previous_response_id   uuid,
    p_outbox_payload         jsonb,
    OUT outcome              text,
    OUT job_id               uuid,     -- the new job, or the one an Idempotency-Key names
    OUT outbox_id            bigint,
    OUT created_at           timestamptz,
    OUT rpm_limit            integer,  -- the key's limits and window, for the x-ratelimit headers
    OUT tpm_limit            integer,
    OUT window_requests      integer,
    OUT window_tokens        bigint,
    OUT window_start         timestamptz,
    OUT limit_value          bigint,   -- the limit a rejection tripped
    OUT reject_window_start  timestamptz,
    OUT budget_left          bigint
) LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    k              record;
    m              record;
    existing       record;
    spent          bigint;
BEGIN
    SELECT a.rpm_limit, a.tpm_limit, a.max_in_flight, a.budget_micro_usd,
           c.in_flight, c.reserved_micro_usd, c.spent_micro_usd, c.period_start,
           CASE a.budget_period
               WHEN 'daily' THEN date_trunc('day', now(), 'UTC')
               WHEN 'monthly' THEN date_trunc('month', now(), 'UTC')
           END AS current_period
      INTO k
      FROM tollgate.key_counters c
      JOIN tollgate.api_keys a ON a.id = c.key_id
     WHERE c.key_id = p_key_id AND c.slot = 0 AND a.revoked_at IS NULL
       AND (a.expires_at IS NULL OR a.expires_at > now())
       FOR UPDATE OF c;
    IF NOT FOUND THEN
        outcome := 'invalid_key';  -- revoked or expired since it was looked up
        RETURN;
    END IF;
    rpm_limit := k.rpm_limit;
    tpm_limit := k.tpm_limit;

    IF p_idempotency_key IS NOT NULL THEN
        SELECT j.id, j.request_hash INTO existing
          FROM tollgate.jobs j
         WHERE j.key_id = p_key_id AND j.idempotency_key = p_idempotency_key;
        IF FOUND THEN
            job_id := existing.id;
            outcome := CASE WHEN existing.request_hash = p_request_hash THEN 'replayed'
                            ELSE 'idempotency_mismatch' END;
            RETURN;
        END IF;
    END IF;

    BEGIN
        IF k.rpm_limit IS NOT NULL OR k.tpm_limit IS NOT NULL THEN
            INSERT INTO tollgate.rate_windows AS w (key_id, slot, window_start, requests, tokens)
            VALUES (p_key_id, 0, date_trunc('minute', now()), 1, p_tokens)
            ON CONFLICT (key_id, slot, window_start)
            DO UPDATE SET requests = w.requests + 1, tokens = w.tokens + EXCLUDED.tokens
            RETURNING w.requests, w.tokens, w.window_start
                 INTO window_requests, window_tokens, window_start;
            reject_window_start := window_start;
            IF window_requests > k.rpm_limit THEN
                outcome := 'key_rpm';
                limit_value := k.rpm_limit;
                RAISE SQLSTATE 'TGREJ';
            END IF;
            IF window_tokens > k.tpm_limit THEN
                outcome := 'key_tpm';
                limit_value := k.tpm_limit;
                RAISE SQLSTATE 'TGREJ';
            END IF;
        END IF;
        IF p_model_rpm IS NOT NULL OR p_model_tpm IS NOT NULL THEN
            -- The model's window is shared by every key: the upsert locks its row until the end
            -- of the statement, so concurrent admissions of the model are exact too.
            INSERT INTO tollgate.model_rate_windows AS w (model, window_start, requests, tokens)
            VALUES (p_model, date_trunc('minute', now()), 1, p_tokens)
            ON CONFLICT (model, window_start)
            DO UPDATE SET requests = w.requests + 1, tokens = w.tokens + EXCLUDED.tokens
            RETURNING w.requests, w.tokens, w.window_start INTO m;
            reject_window_start := m.window_start;
            IF m.requests > p_model_rpm THEN
                outcome := 'model_rpm';
                limit_value := p_model_rpm;
                RAISE SQLSTATE 'TGREJ';
            END IF;
            IF m.tokens > p_model_tpm THEN
                outcome := 'model_tpm';
                limit_value := p_model_tpm;
                RAISE SQLSTATE 'TGREJ';
            END IF;
        END IF;
        IF k.in_flight >= k.max_in_flight THEN
            outcome := 'in_flight';
            limit_value := k.max_in_flight;
            RAISE SQLSTATE 'TGREJ';
        END IF;
        IF k.budget_micro_usd IS NOT NULL THEN
            spent := k.spent_micro_usd;
            IF k.current_period IS NOT NULL AND k.current_period IS DISTINCT FROM k.period_start THEN
                -- A new budget period: spend counts from zero again.
                UPDATE tollgate.key_counters SET spent_micro_usd = 0, period_start = k.current_period
                 WHERE key_id = p_key_id AND slot = 0;
                spent := 0;
            END IF;
            budget_left := k.budget_micro_usd - spent - k.reserved_micro_usd;
            IF p_reserve > budget_left THEN
                outcome := 'budget';
                RAISE SQLSTATE 'TGREJ';
            END IF;
        END IF;
    EXCEPTION WHEN SQLSTATE 'TGREJ' THEN
        RETURN;
    END;

    -- Admitted: take the in-flight slot and the reservation, insert the job and its message.
    UPDATE tollgate.key_counters
       SET in_flight = in_flight + 1, reserved_micro_usd = reserved_micro_usd + p_reserve
     WHERE key_id = p_key_id AND slot = 0;
    INSERT INTO tollgate.jobs AS j
        (id, key_id, model, request, estimated_input_tokens, reserved_micro_usd, counter_slot,
         idempotency_key, request_hash, history, previous_response_id)
    VALUES (p_job_id, p_key_id, p_model, p_request, least(p_tokens, 2147483647)::integer,
            p_reserve, 0, p_idempotency_key, p_request_hash, p_history, p_previous_response_id)
    RETURNING j.id, j.created_at INTO job_id, created_at;
    INSERT INTO tollgate.outbox AS o (job_id, payload) VALUES (p_job_id, p_outbox_payload)
    RETURNING o.id INTO outbox_id;
    outcome := 'admitted';
END
$$;
