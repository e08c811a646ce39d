"""The official OpenAI Python SDK against a running tollgate, used exactly as a user would.

Run by tests/openai_sdk.rs, which starts tollgate and passes:
  TOLLGATE_BASE_URL      e.g. http://127.0.0.1:8080/v1
  TOLLGATE_KEY           a key without limits
  TOLLGATE_LIMITED_KEY   a key allowed one request per minute
  TOLLGATE_EXPECTED_TEXT what the model `mock-1` answers
Model `mock-slow` answers slowly enough to be cancelled. Exits non-zero on the first failure.
"""

import os

import openai
from openai import OpenAI

from polling import wait_done

BASE_URL = os.environ["TOLLGATE_BASE_URL"]
KEY = os.environ["TOLLGATE_KEY"]
LIMITED_KEY = os.environ["TOLLGATE_LIMITED_KEY"]
EXPECTED = os.environ["TOLLGATE_EXPECTED_TEXT"]

client = OpenAI(base_url=BASE_URL, api_key=KEY)
# For the error checks: an error must surface at once, not after the SDK's retries.
no_retry = OpenAI(base_url=BASE_URL, api_key=KEY, max_retries=0)


def check_stream(events, first_sequence_number=0):
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(first_sequence_number, first_sequence_number + len(numbers))), numbers
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return text


def background_and_retrieve():
    response = client.responses.create(
        model="mock-1", input="Say hello", background=True, metadata={"from": "sdk"}
    )
    assert response.status == "queued", response.status
    assert response.background is True
    assert response.id.startswith("resp_")
    done = wait_done(client, response.id)
    assert done.status == "completed", done.status
    assert done.output_text == EXPECTED, done.output_text
    assert done.usage.output_tokens == 20
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert done.metadata == {"from": "sdk"}
    items = client.responses.input_items.list(done.id)
    assert [item.content[0].text for item in items.data] == ["Say hello"], items
    return done.id


def synchronous():
    response = client.responses.create(model="mock-1", input="Wait for me")
    assert response.status == "completed", response.status
    assert response.output_text == EXPECTED


def streamed():
    events = list(client.responses.create(model="mock-1", input="Stream it", stream=True))
    types = [e.type for e in events]
    assert types[:5] == [
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ], types
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ], types
    assert check_stream(events) == EXPECTED
    final = events[-1].response
    assert final.status == "completed" and final.output_text == EXPECTED

    # The SDK's streaming helper accumulates the same events into the final response.
    with client.responses.stream(model="mock-1", input="Stream it again") as stream:
        final = stream.get_final_response()
    assert final.output_text == EXPECTED, final.output_text


def resumed():
    stream = client.responses.create(model="mock-1", input="Resume me", background=True, stream=True)
    seen = []
    for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta" and len(seen) >= 8:
            break
    stream.close()
    response_id = seen[0].response.id
    last = seen[-1].sequence_number
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=last))
    assert rest[0].sequence_number == last + 1, rest[0]
    assert rest[-1].type == "response.completed", rest[-1].type
    assert check_stream(seen + rest) == EXPECTED
    # A late reader replays the whole stream.
    again = list(client.responses.retrieve(response_id, stream=True))
    assert [e.to_dict() for e in again] == [e.to_dict() for e in seen + rest]


def cancel_and_delete():
    response = client.responses.create(model="mock-slow", input="Too slow", background=True)
    cancelled = client.responses.cancel(response.id)
    assert cancelled.status == "cancelled", cancelled.status
    assert client.responses.retrieve(response.id).status == "cancelled"
    assert client.responses.delete(response.id) is None
    try:
        client.responses.retrieve(response.id)
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("a deleted response was found")


def errors():
    try:
        no_retry.responses.retrieve("resp_" + "0" * 32)
    except openai.NotFoundError as e:
        assert e.status_code == 404
    else:
        raise AssertionError("an unknown id was found")

    bad = OpenAI(base_url=BASE_URL, api_key="sk-tg-not-a-key", max_retries=0)
    try:
        bad.responses.create(model="mock-1", input="x", background=True)
    except openai.AuthenticationError as e:
        assert e.status_code == 401
        assert e.code == "invalid_api_key", e.code
    else:
        raise AssertionError("a bad key was accepted")

    limited = OpenAI(base_url=BASE_URL, api_key=LIMITED_KEY, max_retries=0)
    limited.responses.create(model="mock-1", input="one", background=True)
    try:
        limited.responses.create(model="mock-1", input="two", background=True)
    except openai.RateLimitError as e:
        assert e.status_code == 429
        assert e.code == "rate_limit_exceeded", e.code
        assert e.response.headers.get("retry-after")
    else:
        raise AssertionError("the second request passed a limit of one per minute")

    try:
        no_retry.responses.create(model="mock-1", input="x", temperature=7)
    except openai.BadRequestError as e:
        assert e.param == "temperature", e.param
    else:
        raise AssertionError("temperature 7 was accepted")


for check in [background_and_retrieve, synchronous, streamed, resumed, cancel_and_delete, errors]:
    check()
    print(f"ok {check.__name__}", flush=True)
print(f"openai {openai.__version__}: all checks passed")
