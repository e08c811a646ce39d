-- Admissions of one key grouped in one statement: `tollgate.admit_batch` runs `tollgate.admit`
-- for each request of a batch, in order, in one transaction — one lock of the key's counter row
-- and one commit for the whole batch instead of one each. Each request is still decided exactly
-- as alone: `tollgate.admit` locks the key's row (already held after the first request), takes a
-- fresh snapshot for each of its statements and so sees every request admitted before it, in this
-- batch or committed by another; a rejection is undone by its own exception block and leaves the
-- batch's other requests as they were.
--
-- Every batch holds one key, so a statement never waits for two keys' rows: batches of different
-- keys cannot deadlock. The arrays are parallel, one element per request, with the parameters of
-- `tollgate.admit` after the key id; the answer is one row per request, `ord` its 1-based index.
CREATE FUNCTION tollgate.admit_batch(
    p_key_id                 uuid,
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
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_job_id, 1), 0) LOOP
        RETURN QUERY
            SELECT i, a.*
              FROM tollgate.admit(p_key_id, p_tokens[i], p_reserve[i], p_model[i],
                                  p_model_rpm[i], p_model_tpm[i], p_idempotency_key[i],
                                  p_request_hash[i], p_job_id[i], p_request[i], p_history[i],
                                  p_previous_response_id[i], p_outbox_payload[i]) AS a;
    END LOOP;
END
$$;
