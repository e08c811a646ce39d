-- Worker reliability and housekeeping: a running job's worker hears of its cancellation at once
-- (NOTIFY on channel
-- `tollgate_job_cancelled`, payload = the job's uuid), the lease sweeper finds expired leases
-- through an index instead of a scan, and retention finds old rows by index.

CREATE FUNCTION tollgate.notify_cancelled() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tollgate_job_cancelled', NEW.id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_notify_cancelled
    AFTER UPDATE OF status ON tollgate.jobs
    FOR EACH ROW
    WHEN (OLD.status = 'in_progress' AND NEW.status = 'cancelled')
    EXECUTE FUNCTION tollgate.notify_cancelled();

CREATE INDEX jobs_leases ON tollgate.jobs (lease_until) WHERE status = 'in_progress';

-- Retention removes finished jobs (and, by cascade, their events and outbox rows) in batches.
CREATE INDEX jobs_finished ON tollgate.jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX outbox_sent ON tollgate.outbox (sent_at) WHERE sent_at IS NOT NULL;
