-- Documented views for the questions operators ask most (README "SQL on job state"). They read
-- the tables only; drop or replace them freely in later migrations.

-- Jobs by status, with queue wait and run time percentiles (milliseconds) and cost.
CREATE VIEW tollgate.jobs_by_status AS
SELECT status,
       count(*) AS jobs,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at) * 1000)
           AS p50_queue_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at) * 1000)
           AS p99_queue_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000)
           AS p50_run_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000)
           AS p99_run_ms,
       (coalesce(sum(cost_micro_usd), 0) / 1e6)::numeric(14, 6) AS cost_usd
  FROM tollgate.jobs
 GROUP BY status;

-- Spend per key per UTC day: what finished jobs cost and what the key was charged.
CREATE VIEW tollgate.spend_by_key_day AS
SELECT k.id AS key_id, k.name AS key_name,
       date_trunc('day', j.finished_at, 'UTC') AS day,
       count(*) AS jobs,
       coalesce(sum(j.input_tokens), 0) AS input_tokens,
       coalesce(sum(j.output_tokens), 0) AS output_tokens,
       (coalesce(sum(j.cost_micro_usd), 0) / 1e6)::numeric(14, 6) AS cost_usd,
       (coalesce(sum(j.charged_micro_usd), 0) / 1e6)::numeric(14, 6) AS charged_usd
  FROM tollgate.jobs j JOIN tollgate.api_keys k ON k.id = j.key_id
 WHERE j.finished_at IS NOT NULL
 GROUP BY k.id, k.name, date_trunc('day', j.finished_at, 'UTC');

-- Each key's limits beside its live counters (summed over its slots).
CREATE VIEW tollgate.key_usage AS
SELECT k.id AS key_id, k.name AS key_name, k.key_prefix,
       k.rpm_limit, k.tpm_limit, k.max_in_flight,
       (k.budget_micro_usd / 1e6)::numeric(14, 6) AS budget_usd, k.budget_period,
       sum(c.in_flight) AS in_flight,
       (sum(c.reserved_micro_usd) / 1e6)::numeric(14, 6) AS reserved_usd,
       (sum(c.spent_micro_usd) / 1e6)::numeric(14, 6) AS spent_usd,
       k.revoked_at, k.expires_at
  FROM tollgate.api_keys k JOIN tollgate.key_counters c ON c.key_id = k.id
 GROUP BY k.id;

-- Rejections by reason per hour (the nil key id means: no valid key).
CREATE VIEW tollgate.rejections_by_reason AS
SELECT date_trunc('hour', minute) AS hour, reason, sum(count) AS rejections
  FROM tollgate.rejections
 GROUP BY 1, 2;
