-- The worker ends many attempts in one statement (group commit): `tollgate.finish_batch` moves
-- each given attempt that still owns its job (`in_progress`, same attempt) to its terminal state,
-- with its usage, cost and error, and assembles its output — as the single-job finish did — and
-- returns the ids of the jobs it finished. The triggers of 20261124000002_exact_admission.sql
-- give back what admission took, job by job, as before.
--
-- One statement ending many jobs takes many rows' locks, so it takes them in the one order every
-- other transaction follows — the job rows, then the keys' counter rows, then the models'
-- windows — and, within each, sorted: a finish or cancel of one job locks its row, then (by the
-- trigger) its key's row, then its model's window; an admission batch locks its key's row, then
-- the models' windows by name. Two batches, or a batch and any of those, never wait for each
-- other in a cycle.
CREATE FUNCTION tollgate.finish_batch(
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
     WHERE (c.key_id, c.slot) IN (SELECT j.key_id, j.counter_slot FROM tollgate.jobs j
                                   WHERE j.id = ANY(p_ids) AND j.status = 'in_progress')
     ORDER BY c.key_id, c.slot FOR UPDATE;
    PERFORM 1 FROM tollgate.model_rate_windows w
     WHERE (w.model, w.window_start) IN (SELECT j.model, date_trunc('minute', j.created_at)
                                           FROM tollgate.jobs j
                                          WHERE j.id = ANY(p_ids) AND j.status = 'in_progress')
     ORDER BY w.model, w.window_start FOR UPDATE;
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

-- `tollgate.generated` as PL/pgSQL: same answer, same snapshot (STABLE: the calling statement's),
-- but its query is planned once per session and kept, where the SQL function's body was parsed
-- and planned again at every call (twice per finished job).
CREATE OR REPLACE FUNCTION tollgate.generated(p_job uuid, p_attempt integer, p_kinds text)
RETURNS text LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(string_agg(p.delta, '' ORDER BY e.seq_first, p.n), '')
              FROM tollgate.job_events e,
                   unnest(e.deltas, regexp_split_to_array(e.kinds, ''))
                       WITH ORDINALITY AS p(delta, kind, n)
             WHERE e.job_id = p_job AND e.attempt = p_attempt AND strpos(p_kinds, p.kind) > 0);
END
$$;
