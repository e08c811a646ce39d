-- Admission batches across keys, and the finish batch's locks taken by primary key.
--
-- 1. `tollgate.admit_many` replaces `tollgate.admit_batch` (20261201000001), whose batches held
--    one key each: a batch now holds the waiting requests of many keys, and locks their counter
--    rows first, sorted.
-- 2. `tollgate.finish_batch` (20261201000002) locks the counter rows and model windows of every
--    given job, finished or not: its condition on the status had led the planner to the index of
--    unfinished jobs, thousands under load, instead of the primary key (4.1 ms a batch instead of
--    1.9).
--
-- Lock order, which every transaction follows (see src/store/ledger.rs): job rows, then the keys'
-- counter rows, sorted, then the models' windows, sorted. A finish or cancel of one job locks its
-- row, then (by trigger) its key's row, then its model's window; an admission batch locks its
-- keys' rows, sorted, then the models' windows by name. No two transactions wait for each other
-- in a cycle.

DROP FUNCTION tollgate.admit_batch(uuid, bigint[], bigint[], text[], bigint[], bigint[], text[],
                                   bytea[], uuid[], jsonb[], jsonb[], uuid[], jsonb[]);

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

CREATE OR REPLACE FUNCTION tollgate.finish_batch(
    p_ids                uuid[],
    p_attempts           integer[],
    p_statuses           tollgate.job_status[],
    p_input_tokens       integer[],
    p_output_tokens      integer[],
    p_costs              bigint[],
    p_errors             jsonb[],
    p_usage_estimated    boolean[],
    p_incomplete_reasons text[],
    p_reasoning_tokens   integer[]
) RETURNS SETOF uuid LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM 1 FROM tollgate.jobs j WHERE j.id = ANY(p_ids) ORDER BY j.id FOR UPDATE;
    PERFORM 1 FROM tollgate.key_counters c
      JOIN (SELECT DISTINCT j.key_id, j.counter_slot FROM tollgate.jobs j
             WHERE j.id = ANY(p_ids)) k
        ON c.key_id = k.key_id AND c.slot = k.counter_slot
     ORDER BY c.key_id, c.slot FOR UPDATE OF c;
    PERFORM 1 FROM tollgate.model_rate_windows w
      JOIN (SELECT DISTINCT j.model, date_trunc('minute', j.created_at) AS window_start
              FROM tollgate.jobs j
             WHERE j.id = ANY(p_ids)) m
        ON w.model = m.model AND w.window_start = m.window_start
     ORDER BY w.model, w.window_start FOR UPDATE OF w;
    RETURN QUERY
        UPDATE tollgate.jobs j
           SET status = f.status, input_tokens = f.input_tokens, output_tokens = f.output_tokens,
               cost_micro_usd = coalesce(j.cost_micro_usd, 0) + f.cost,
               usage_estimated = f.usage_estimated, incomplete_reason = f.incomplete_reason,
               reasoning_tokens = f.reasoning_tokens, settled_attempt = j.attempt,
               error = f.error, finished_at = now(), updated_at = now(), lease_until = NULL,
               output_text = tollgate.generated(j.id, j.attempt, 't'),
               output_arguments = tollgate.generated(j.id, j.attempt, 'a')
          FROM unnest(p_ids, p_attempts, p_statuses, p_input_tokens, p_output_tokens, p_costs,
                      p_errors, p_usage_estimated, p_incomplete_reasons, p_reasoning_tokens)
               AS f(id, attempt, status, input_tokens, output_tokens, cost, error,
                    usage_estimated, incomplete_reason, reasoning_tokens)
         WHERE j.id = f.id AND j.attempt = f.attempt AND j.status = 'in_progress'
        RETURNING j.id;
END
$$;
