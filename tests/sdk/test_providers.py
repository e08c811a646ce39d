"""The official OpenAI Python SDK against tollgate fronting real wire formats: an Anthropic
Messages upstream, an OpenAI Responses-API upstream, and a chat-completions upstream that stops at
its length cap. The upstreams are fake servers replaying recorded streams.

Run by tests/openai_sdk.rs, which starts tollgate and passes:
  TOLLGATE_BASE_URL   e.g. http://127.0.0.1:8080/v1
  TOLLGATE_KEY        a key without limits
  TOLLGATE_CASES      `model=expected text` lines: models whose answer completes
  TOLLGATE_CUT_OFF    `model=expected text`: a model whose answer stops at its length cap
Exits non-zero on the first failure.
"""

import os

from openai import OpenAI

from polling import wait_done

client = OpenAI(base_url=os.environ["TOLLGATE_BASE_URL"], api_key=os.environ["TOLLGATE_KEY"])


def cases(var):
    return [line.split("=", 1) for line in os.environ[var].splitlines() if line]


def streamed(model):
    """Creates a streaming background job; returns its text and its last event."""
    text, last = "", None
    with client.responses.create(
        model=model, input="Say hi", background=True, stream=True
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text += event.delta
            last = event
    return text, last


for model, expected in cases("TOLLGATE_CASES"):
    job = client.responses.create(model=model, input="Say hi", background=True)
    done = wait_done(client, job.id)
    assert done.status == "completed", (model, done.status, done.error)
    assert done.output_text == expected, (model, done.output_text)
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0, (model, done.usage)
    text, last = streamed(model)
    assert text == expected, (model, text)
    assert last.type == "response.completed", (model, last.type)
    assert last.response.output_text == expected
    print(f"{model}: completed")

for model, expected in cases("TOLLGATE_CUT_OFF"):
    job = client.responses.create(model=model, input="Tell me a story", background=True)
    done = wait_done(client, job.id)
    assert done.status == "incomplete", (model, done.status)
    assert done.incomplete_details.reason == "max_output_tokens", done.incomplete_details
    assert done.output_text == expected, (model, done.output_text)
    text, last = streamed(model)
    assert text == expected, (model, text)
    assert last.type == "response.incomplete", (model, last.type)
    assert last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    print(f"{model}: incomplete")

print("all provider checks passed")
