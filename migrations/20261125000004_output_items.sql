-- Responses carry more than text: function calls, conversation state and reasoning usage.
--
-- `job_events.kinds`: one letter per entry of `deltas`, saying what the entry is. Each entry is
-- one event of the response's stream (event 3 + i is entry i of the latest attempt):
--   m  an assistant message opens        p  its text part opens        t  text (the entry)
--   T  the text is whole                 P  the part is whole
--   f  a function call opens (the entry is {"call_id", "name"} as JSON)
--   a  arguments text (the entry)        A  the arguments are whole
--   D  the item (message or call) is whole
-- `seq_first` / `seq_last` now number entries of every kind. Rows written before this migration
-- held text deltas only, numbered from 0; they are renumbered behind an `mp` row, so every
-- attempt reads the same way. (The primary key is rebuilt around the renumbering, which would
-- otherwise collide with itself row by row.)
ALTER TABLE tollgate.job_events ADD COLUMN kinds text;
ALTER TABLE tollgate.job_events DROP CONSTRAINT job_events_pkey;
UPDATE tollgate.job_events
   SET seq_first = seq_first + 2, seq_last = seq_last + 2,
       kinds = repeat('t', cardinality(deltas));
INSERT INTO tollgate.job_events (job_id, attempt, seq_first, seq_last, deltas, kinds, created_at)
SELECT job_id, attempt, 0, 1, ARRAY['', ''], 'mp', min(created_at)
  FROM tollgate.job_events GROUP BY job_id, attempt;
ALTER TABLE tollgate.job_events
    ADD PRIMARY KEY (job_id, attempt, seq_first),
    ALTER COLUMN kinds SET NOT NULL,
    ADD CONSTRAINT job_events_kinds_match
        CHECK (length(kinds) = cardinality(deltas) AND seq_last - seq_first + 1 = cardinality(deltas));

-- `output_text` stays the text of the job's messages (every message, in order); function calls
-- are read from `job_events` (kinds `f` and `a`).
--
-- `history`: the conversation before this request's input, when it named a
-- `previous_response_id`: that response's history, input and output, as Responses API items
-- (`message`, `function_call`, `function_call_output`). Copied at admission, so the job runs the
-- same whatever happens to the earlier response later.
-- `previous_response_id`: the job named (no foreign key: the earlier job may be deleted).
-- `reasoning_tokens`: the part of `output_tokens` the model spent reasoning, as reported.
ALTER TABLE tollgate.jobs
    ADD COLUMN history              jsonb,
    ADD COLUMN previous_response_id uuid,
    ADD COLUMN reasoning_tokens     integer;

-- `output_arguments`: the function-call arguments the latest attempt streamed, beside the text of
-- its messages in `output_text`. Both grow in the statement that writes the attempt's event rows,
-- so the job row alone says what a stopped attempt generated: cancel, delete and the claim after
-- a dead worker charge `output_text || output_arguments`, read from the row they lock.
ALTER TABLE tollgate.jobs ADD COLUMN output_arguments text NOT NULL DEFAULT '';
