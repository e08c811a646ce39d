-- A worker that stops gracefully (SIGTERM, a rolling deploy) hands its running jobs back; that is
-- no failure of the job, so it must not use up one of the job's `worker.max_attempts`.
-- `handbacks` counts such hand-backs: the attempts a job has really used are
-- `attempt - handbacks`. (`attempt` itself still rises with every claim, since it numbers the
-- job's event rows and tells stream readers that an attempt was abandoned.)
ALTER TABLE tollgate.jobs ADD COLUMN handbacks integer NOT NULL DEFAULT 0;
