"""Responses API fidelity through the official OpenAI Python SDK: function calling, structured
outputs, reasoning, conversation state and refusals, each checked also in what the Response
object echoes of the request. The models sit behind fake upstreams of each wire format (chat
completions, Anthropic Messages, Responses) that replay scripted streams; tests/fidelity.rs checks
what those upstreams received.

Run by tests/fidelity.rs, which starts tollgate and the upstreams and passes:
  TOLLGATE_BASE_URL    e.g. http://127.0.0.1:8080/v1
  TOLLGATE_KEY         a key without limits
  TOLLGATE_OTHER_KEY   a second key: the first key's responses do not exist for it
  TOLLGATE_SCENARIOS   `scenario=model` lines, run in order; a scenario is one function below
  TOLLGATE_EXPECT      JSON: the questions, the tool and what the upstreams were scripted to answer
Prints a line per passed scenario and `all fidelity checks passed` at the end; exits non-zero on
the first failure.
"""

import json
import os
import secrets

import openai
from openai import OpenAI
from pydantic import BaseModel

from polling import wait_done

client = OpenAI(base_url=os.environ["TOLLGATE_BASE_URL"], api_key=os.environ["TOLLGATE_KEY"])
other = OpenAI(base_url=os.environ["TOLLGATE_BASE_URL"], api_key=os.environ["TOLLGATE_OTHER_KEY"])
EXPECT = json.loads(os.environ["TOLLGATE_EXPECT"])

QUESTION = EXPECT["question"]
TOOLS = [{"type": "function", "name": "get_weather", "parameters": EXPECT["parameters"]}]
TOOL_RESULT = EXPECT["tool_result"]
WEATHER_FORMAT = {
    "type": "json_schema",
    "name": "weather",
    "schema": EXPECT["weather_schema"],
    "strict": True,
}


class Weather(BaseModel):
    city: str
    temp_c: int


def finished(response):
    """Waits for a background response and asserts it completed."""
    done = wait_done(client, response.id)
    assert done.status == "completed", (done.model, done.status, done.error)
    return done


def refused(error_class, code, param, create):
    """Asserts that `create()` is refused with this error class, code and param."""
    try:
        create()
    except error_class as e:
        assert e.code == code, (e.code, e.message)
        assert e.param == param, (e.param, e.message)
        assert e.type == "invalid_request_error", (e.type, e.message)
        return e
    except openai.APIStatusError as e:
        raise AssertionError(f"expected {error_class.__name__}, got {e.status_code}: {e.body}")
    raise AssertionError(f"expected {error_class.__name__} ({code}), but it was accepted")


def check_call(output, model):
    """The last output item is the scripted call of `get_weather`."""
    assert output, (model, "no output")
    item = output[-1]
    assert item.type == "function_call", (model, item)
    assert item.name == "get_weather", (model, item.name)
    assert json.loads(item.arguments) == {"city": "Paris"}, (model, item.arguments)
    assert item.call_id, (model, item)


def function_calling(model):
    """A function call and its result, in the background and streamed; the stream resumed."""
    first = finished(
        client.responses.create(
            model=model,
            input=QUESTION,
            tools=TOOLS,
            tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False,
            background=True,
        )
    )
    check_call(first.output, model)
    call = first.output[-1]
    # The object echoes what was asked, as it was sent.
    assert [t.model_dump(exclude_none=True) for t in first.tools] == TOOLS, (model, first.tools)
    assert first.tool_choice.model_dump() == {"type": "function", "name": "get_weather"}, (
        model,
        first.tool_choice,
    )
    assert first.parallel_tool_calls is False, (model, first.parallel_tool_calls)
    assert first.previous_response_id is None, (model, first.previous_response_id)

    with client.responses.create(
        model=model, input=QUESTION, tools=TOOLS, background=True, stream=True
    ) as stream:
        events = list(stream)
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events))), (model, numbers)
    assert events[-1].type == "response.completed", (model, events[-1].type)
    check_call(events[-1].response.output, model)
    added = [
        e
        for e in events
        if e.type == "response.output_item.added" and e.item.type == "function_call"
    ]
    assert len(added) == 1 and added[0].item.name == "get_weather", (model, added)
    index = added[0].output_index
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas and len(done) == 1, (model, [e.type for e in events])
    item_id = added[0].item.id
    assert all(e.output_index == index for e in deltas + done), (model, deltas, done)
    assert all(e.item_id == item_id for e in deltas + done), (model, item_id, deltas, done)
    assert "".join(e.delta for e in deltas) == done[0].arguments, (model, deltas, done)
    assert json.loads(done[0].arguments) == {"city": "Paris"}, (model, done[0].arguments)
    item_done = [
        e for e in events if e.type == "response.output_item.done" and e.output_index == index
    ]
    assert len(item_done) == 1 and item_done[0].item.arguments == done[0].arguments, (
        model,
        item_done,
    )
    assert item_done[0].item.id == item_id and item_done[0].item.status == "completed", (
        model,
        item_done[0].item,
    )
    # The words before the call are a message of their own; the object retrieved is the one the
    # stream ended with.
    completed = events[-1].response
    assert completed.output_text == EXPECT["preamble"], (model, completed.output_text)
    assert [i.type for i in completed.output] == ["message", "function_call"], (model, completed)
    retrieved = client.responses.retrieve(completed.id)
    assert retrieved.model_dump() == completed.model_dump(), (model, retrieved, completed)
    # Resumed after the first arguments delta: the rest of the same events.
    after = deltas[0].sequence_number
    with client.responses.retrieve(
        events[0].response.id, stream=True, starting_after=after
    ) as stream:
        rest = list(stream)
    assert [e.model_dump() for e in rest] == [e.model_dump() for e in events[after + 1 :]], (
        model,
        [e.type for e in rest],
    )

    second = finished(
        client.responses.create(
            model=model,
            input=[
                {"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT}
            ],
            previous_response_id=first.id,
            tools=TOOLS,
            background=True,
        )
    )
    assert second.output_text == EXPECT["final_text"], (model, second.output_text)
    assert second.previous_response_id == first.id, (model, second.previous_response_id)
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"], (model, items.data)
    assert items.data[0].call_id == call.call_id, (model, items.data[0])
    assert items.data[0].output == TOOL_RESULT, (model, items.data[0])


def structured_output(model):
    """`text.format` json_schema in the background, and `responses.parse` with a pydantic model."""
    done = finished(
        client.responses.create(
            model=model,
            input="The weather in Paris, as JSON.",
            text={"format": WEATHER_FORMAT},
            background=True,
        )
    )
    answer = json.loads(done.output_text)
    schema = EXPECT["weather_schema"]
    assert sorted(answer) == sorted(schema["properties"]), (model, answer)
    types = {"string": str, "integer": int}
    for name, spec in schema["properties"].items():
        assert isinstance(answer[name], types[spec["type"]]), (model, name, answer)
    assert answer == EXPECT["weather"], (model, answer)
    echoed = done.text.format.model_dump(by_alias=True, exclude_none=True)
    assert echoed == WEATHER_FORMAT, (model, echoed)

    # Neither background nor stream: tollgate answers once the job is finished.
    parsed = client.responses.parse(
        model=model, input="The weather in Paris, as JSON.", text_format=Weather
    )
    assert parsed.status == "completed", (model, parsed.status, parsed.error)
    assert parsed.output_parsed == Weather(**EXPECT["weather"]), (model, parsed.output_parsed)
    assert parsed.text.format.type == "json_schema", (model, parsed.text.format)
    assert parsed.text.format.name == "Weather", (model, parsed.text.format)

    # JSON mode: any JSON object.
    done = finished(
        client.responses.create(
            model=model,
            input="The weather in Paris, as a JSON object.",
            text={"format": {"type": "json_object"}},
            background=True,
        )
    )
    assert json.loads(done.output_text) == EXPECT["weather"], (model, done.output_text)
    assert done.text.format.type == "json_object", (model, done.text.format)


def structured_output_refused(model):
    """A model whose provider cannot take `text.format` refuses it."""
    for fmt in (WEATHER_FORMAT, {"type": "json_object"}):
        refused(
            openai.BadRequestError,
            "unsupported_parameter",
            "text.format",
            lambda: client.responses.create(
                model=model, input="JSON, please.", text={"format": fmt}, background=True
            ),
        )


def reasoning_refused(model):
    """A model whose provider cannot take `reasoning.effort` refuses it."""
    refused(
        openai.BadRequestError,
        "unsupported_parameter",
        "reasoning.effort",
        lambda: client.responses.create(
            model=model, input="Think hard.", reasoning={"effort": "high"}, background=True
        ),
    )


def reasoning(model):
    """`reasoning.effort` is echoed, and the reasoning tokens the upstream reported are shown."""
    done = finished(
        client.responses.create(
            model=model,
            input="What is 17 * 23? Think it through.",
            reasoning={"effort": "high"},
            background=True,
        )
    )
    assert done.reasoning.effort == "high", (model, done.reasoning)
    assert done.output_text == EXPECT["reasoning_text"], (model, done.output_text)
    usage = done.usage
    assert usage.output_tokens == EXPECT["output_tokens"], (model, usage)
    assert usage.output_tokens_details.reasoning_tokens == EXPECT["reasoning_tokens"], (
        model,
        usage,
    )
    assert usage.input_tokens == EXPECT["input_tokens"], (model, usage)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens, (model, usage)


def conversation(model):
    """Three turns chained by `previous_response_id`; ids that cannot be continued are refused."""
    turns, answers = EXPECT["turns"], EXPECT["answers"]
    first = finished(
        client.responses.create(
            model=model, input=turns[0], instructions=EXPECT["instructions"], background=True
        )
    )
    second = finished(
        client.responses.create(
            model=model, input=turns[1], previous_response_id=first.id, background=True
        )
    )
    third = finished(
        client.responses.create(
            model=model, input=turns[2], previous_response_id=second.id, background=True
        )
    )
    assert [r.output_text for r in (first, second, third)] == answers, model
    assert [r.previous_response_id for r in (first, second, third)] == [None, first.id, second.id]
    assert first.instructions == EXPECT["instructions"], (model, first.instructions)
    # What was not asked for is echoed with OpenAI's defaults.
    defaults = (first.tools, first.tool_choice, first.parallel_tool_calls, first.text.format.type,
                first.reasoning.effort)
    assert defaults == ([], "auto", True, "text", None), (model, defaults)
    assert third.instructions is None, (model, third.instructions)
    # Only the request's own input is listed, not the history.
    items = client.responses.input_items.list(third.id)
    assert [i.content[0].text for i in items.data] == [turns[2]], (model, items.data)

    unknown = "resp_" + secrets.token_hex(16)
    refused(
        openai.NotFoundError,
        "previous_response_not_found",
        "previous_response_id",
        lambda: client.responses.create(
            model=model, input="And then?", previous_response_id=unknown, background=True
        ),
    )
    # Another key's response does not exist for this key.
    refused(
        openai.NotFoundError,
        "previous_response_not_found",
        "previous_response_id",
        lambda: other.responses.create(
            model=model, input="And then?", previous_response_id=first.id, background=True
        ),
    )
    unstored = finished(
        client.responses.create(model=model, input=turns[0], store=False, background=True)
    )
    assert unstored.store is False, (model, unstored.store)
    refused(
        openai.BadRequestError,
        "previous_response_not_stored",
        "previous_response_id",
        lambda: client.responses.create(
            model=model, input="And then?", previous_response_id=unstored.id, background=True
        ),
    )


def refusals(model):
    """Hosted tools and unknown fields are refused, naming the field."""
    refused(
        openai.BadRequestError,
        "unsupported_parameter",
        "tools[0].type",
        lambda: client.responses.create(
            model=model, input=QUESTION, tools=[{"type": "web_search"}], background=True
        ),
    )
    refused(
        openai.BadRequestError,
        "unknown_parameter",
        "colour",
        lambda: client.responses.create(
            model=model, input=QUESTION, extra_body={"colour": "blue"}, background=True
        ),
    )


SCENARIOS = {
    f.__name__: f
    for f in (
        function_calling,
        structured_output,
        structured_output_refused,
        reasoning,
        reasoning_refused,
        conversation,
        refusals,
    )
}

for line in os.environ["TOLLGATE_SCENARIOS"].splitlines():
    if not line:
        continue
    scenario, model = line.split("=", 1)
    SCENARIOS[scenario](model)
    print(f"{scenario} ({model}): passed", flush=True)

print("all fidelity checks passed")
