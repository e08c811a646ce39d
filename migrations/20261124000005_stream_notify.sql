-- Live streams: every change a stream reader must see — a new batch of deltas, a change of a job's
-- status or attempt, a deleted job — is announced on the channel `tollgate_job_events` with the
-- job's id as payload. Readers LISTEN once per front process and re-read the rows on a
-- notification, so the rows stay the only source of truth and a missed notification only delays.

CREATE FUNCTION tollgate.notify_job_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'job_events' THEN
        PERFORM pg_notify('tollgate_job_events', NEW.job_id::text);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tollgate_job_events', OLD.id::text);
    ELSE
        PERFORM pg_notify('tollgate_job_events', NEW.id::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER job_events_notify
    AFTER INSERT ON tollgate.job_events
    FOR EACH ROW EXECUTE FUNCTION tollgate.notify_job_event();

CREATE TRIGGER jobs_notify_change
    AFTER UPDATE ON tollgate.jobs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.attempt IS DISTINCT FROM NEW.attempt)
    EXECUTE FUNCTION tollgate.notify_job_event();

CREATE TRIGGER jobs_notify_delete
    AFTER DELETE ON tollgate.jobs
    FOR EACH ROW EXECUTE FUNCTION tollgate.notify_job_event();
