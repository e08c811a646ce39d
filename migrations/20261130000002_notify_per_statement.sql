-- One NOTIFY per statement that writes streamed output, not one per event row: the worker writes
-- many jobs' batches in one statement (its group commit), and a notification per row would cost
-- as much as the rows. The payload of `tollgate_job_events` is now one job id or several,
-- separated by commas (at most 200 per notification, well under PostgreSQL's 8000-byte limit).
-- Changes of a job's status or attempt, and deletions, still notify one id each.

DROP TRIGGER job_events_notify ON tollgate.job_events;

CREATE FUNCTION tollgate.notify_job_events_written() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids text;
BEGIN
    FOR ids IN
        SELECT string_agg(job_id::text, ',')
          FROM (SELECT job_id, (row_number() OVER (ORDER BY job_id) - 1) / 200 AS chunk
                  FROM (SELECT DISTINCT job_id FROM written) d) c
         GROUP BY chunk
    LOOP
        PERFORM pg_notify('tollgate_job_events', ids);
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER job_events_notify
    AFTER INSERT ON tollgate.job_events
    REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate.notify_job_events_written();
