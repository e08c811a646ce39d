-- Admissions grouped in one statement: `tollgate.admit_many` runs `tollgate.admit` for each
-- request of a batch, in order, in one transaction — one commit for the whole batch instead of one
-- each. Each request is still decided exactly as alone: `tollgate.admit` locks its key's counter
-- row (already held here), takes a fresh snapshot for each of its statements and so sees every
-- request admitted before it, in this batch or committed by another; a rejection is undone by its
-- own exception block and leaves the batch's other requests as they were.
--
-- The keys' counter rows are locked first, sorted by key:
-- - `p_wait_for_keys` false (the front's batches of many keys): with `SKIP LOCKED`, so the batch
--   never waits for a key another transaction holds; the requests of such a key answer `busy`
--   and nothing is counted for them (the front sends them on by the other way);
-- - `p_wait_for_keys` true (the front's batches of one key): waiting for the key's row.
-- The models' windows are then locked as the requests come, so the caller orders the requests by
-- model. Every transaction takes its rows in one order — job rows, key rows (sorted), model
-- windows (sorted) — so none waits for another in a cycle (see src/store/ledger.rs).
--
-- The arrays are parallel, one element per request: the key, then the parameters of
-- `tollgate.admit` after the key id. The answer is one row per request, `ord` its 1-based index,
-- with the columns of `tollgate.admit`; `outcome` may also be `busy`.
CREATE FUNCTION tollgate.admit_many(
    p_wait_for_keys          boolean,
    p_key_ids                uuid[],
    p_tokens                 bigint[],
    p_reserve                bigint[],
    p_model                  text[],
    p_model_rpm              bigint[],
    p_model_tpm              bigint[],
    p_idempotency_key        text[],
    p_request_hash           bytea[],
    p_job_id                 uuid[],
    p_request                jsonb[],
    p_history                jsonb[],
    p_previous_response_id   uuid[],
    p_outbox_payload         jsonb[]
) RETURNS TABLE (
    ord                  integer,
    outcome              text,
    job_id               uuid,
    outbox_id            bigint,
    created_at           timestamptz,
    rpm_limit            integer,
    tpm_limit            integer,
    window_requests      integer,
    window_tokens        bigint,
    window_start         timestamptz,
    limit_value          bigint,
    reject_window_start  timestamptz,
    budget_left          bigint
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    held uuid[];
BEGIN
    IF p_wait_for_keys THEN
        SELECT coalesce(array_agg(c.key_id), '{}') INTO held
          FROM (SELECT k.key_id FROM tollgate.key_counters k
                 WHERE k.key_id = ANY(p_key_ids) AND k.slot = 0
                 ORDER BY k.key_id FOR UPDATE) c;
    ELSE
        SELECT coalesce(array_agg(c.key_id), '{}') INTO held
          FROM (SELECT k.key_id FROM tollgate.key_counters k
                 WHERE k.key_id = ANY(p_key_ids) AND k.slot = 0
                 ORDER BY k.key_id FOR UPDATE SKIP LOCKED) c;
    END IF;
    FOR i IN 1 .. coalesce(array_length(p_job_id, 1), 0) LOOP
        IF p_wait_for_keys OR p_key_ids[i] = ANY(held) THEN
            RETURN QUERY
                SELECT i, a.*
                  FROM tollgate.admit(p_key_ids[i], p_tokens[i], p_reserve[i], p_model[i],
                                      p_model_rpm[i], p_model_tpm[i], p_idempotency_key[i],
                                      p_request_hash[i], p_job_id[i], p_request[i],
                                      p_history[i], p_previous_response_id[i],
                                      p_outbox_payload[i]) AS a;
        ELSE
            RETURN QUERY
                SELECT i, 'busy'::text, NULL::uuid, NULL::bigint, NULL::timestamptz,
                       NULL::integer, NULL::integer, NULL::integer, NULL::bigint,
                       NULL::timestamptz, NULL::bigint, NULL::timestamptz, NULL::bigint;
        END IF;
    END LOOP;
END
$$;
