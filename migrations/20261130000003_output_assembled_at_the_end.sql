-- `jobs.output_text` and `jobs.output_arguments` are no longer rewritten by every flush of
-- streamed output (`output_text || delta` rewrote the whole growing text each time: a cost
-- quadratic in the answer's length). While an attempt runs, its output is only in `job_events`;
-- the two columns are assembled from the attempt's event rows when it ends (finished by its
-- worker, cancelled, or charged by the next attempt after its worker died).
--
-- `tollgate.generated(job, attempt, kinds)`: the pieces of that attempt whose kind is in `kinds`
-- (`t` message text, `a` function-call arguments; see 20261125000004_output_items.sql), joined
-- in order. It reads with the snapshot of the statement that calls it: call it in a statement
-- that runs after the job's row is locked, so it sees every batch committed before the lock
-- (a batch written later waits for the lock and then finds the attempt no longer running).
CREATE FUNCTION tollgate.generated(p_job uuid, p_attempt integer, p_kinds text)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(string_agg(p.delta, '' ORDER BY e.seq_first, p.n), '')
      FROM tollgate.job_events e,
           unnest(e.deltas, regexp_split_to_array(e.kinds, '')) WITH ORDINALITY AS p(delta, kind, n)
     WHERE e.job_id = p_job AND e.attempt = p_attempt AND strpos(p_kinds, p.kind) > 0
$$;
