-- Every terminal path charges what was used, and cut-off answers say why.
--
-- `usage_estimated`: how `input_tokens` / `output_tokens` were taken. false: the upstream reported
-- them. true: tollgate estimated them with the model's tokenizer (the upstream sent no usage, or
-- the job ended before it could: cancelled, deleted, failed or timed out mid-stream). NULL: no
-- usage at all (nothing was asked of the upstream, or it produced nothing).
--
-- `incomplete_reason`: why a job ended `incomplete`, as OpenAI's `incomplete_details.reason`.
--
-- `settled_attempt`: the latest attempt whose cost is in `cost_micro_usd` (or that cost nothing).
-- An attempt above it whose worker died left its streamed output unpaid; the next claim charges it.
--
-- From this migration on, `cost_micro_usd` is the cost of every attempt of the job: an attempt
-- that streamed output and then failed retryably, was handed back at shutdown, or lost its worker
-- was paid for upstream, so its estimated cost is added before the next attempt runs. The release trigger
-- still charges the key `least(cost_micro_usd, reserved_micro_usd)`.
ALTER TABLE tollgate.jobs
    ADD COLUMN usage_estimated   boolean,
    ADD COLUMN settled_attempt   integer NOT NULL DEFAULT 0,
    ADD COLUMN incomplete_reason text
        CHECK (incomplete_reason IN ('max_output_tokens', 'content_filter'));
