"""Tool calls and structured outputs through the real server and the official openai client.

The demo model (SmolLM2-135M-Instruct) with the shipped ChatML template, which shows
tools, as ``--chat-template chatml`` gives it: named and required tool choice give calls whose arguments
validate against the function's schema, auto lets the model choose, calls stream as
OpenAI's deltas, a tool round trip renders, and ``response_format`` json_schema /
json_object answers validate. The tiny random model checks the cheap parts: template
without tools is a 400, what the grammar library cannot enforce is a 400 naming it,
constrained and free rows decode in one batch, the call splitter never leaks a marker.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server_util import letter_bias, serve_in_thread

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def demo(smollm2_path):
    from mlx_tune.model.chat_templates import use_chat_template
    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app
    from mlx_tune.server.fastpath import prepare_for_serving

    model, tokenizer, info = load_model(smollm2_path)
    use_chat_template(tokenizer, "chatml")  # what `mlx-tune serve --chat-template chatml` does
    prepare_for_serving(model)
    app, _, _ = build_app(model, tokenizer, info, max_batch=4)
    with serve_in_thread(app) as url:
        from openai import OpenAI

        yield OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300), url


def valid_call(call) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


@pytest.mark.slow
def test_named_and_required_tool_choice_give_valid_calls(demo):
    client, _ = demo
    r = client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, temperature=0, max_tokens=64,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    valid_call(call)
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=temperature, seed=3, max_tokens=64)
        assert r.choices[0].finish_reason == "tool_calls"
        for call in r.choices[0].message.tool_calls:
            valid_call(call)


@pytest.mark.slow
def test_streamed_call_deltas_and_a_round_trip(demo):
    client, url = demo
    stream = client.chat.completions.create(model="base", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=64, stream=True)
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        for d in choice.delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert c["id"] is None and d.function.name  # id and name come first, once
                c["id"], c["name"] = d.id, d.function.name
            c["arguments"] += d.function.arguments or ""
        assert not (choice.delta.content or "").count("<tool_call>")
    assert reasons[-1] == "tool_calls" and calls
    first = calls[0]
    args = json.loads(first["arguments"])
    jsonschema.validate(args, SCHEMAS[first["name"]])

    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": first["id"], "type": "function", "function": {"name": first["name"], "arguments": first["arguments"]}}]},
        {"role": "tool", "tool_call_id": first["id"], "content": json.dumps({"temperature": 21, "sky": "clear"})},
    ]
    r = client.chat.completions.create(model="base", messages=history, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=24)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    r = client.chat.completions.create(model="base", messages=history, tools=TOOLS, temperature=0, max_tokens=48)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.slow
def test_json_schema_and_json_object(demo):
    from mlx_tune.testing.schemas import SUITE

    client, _ = demo
    for name in ("flat", "enum", "numbers"):
        schema, _ = SUITE[name]
        r = client.chat.completions.create(
            model="base", temperature=0, max_tokens=96, messages=[{"role": "user", "content": "An example, as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model="base", temperature=0, max_tokens=64,
                                       messages=[{"role": "user", "content": "Describe a cat as JSON."}],
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model="base", prompt="A user record:", max_tokens=64, temperature=0,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "enum", "schema": SUITE["enum"][0]}}})
    jsonschema.validate(json.loads(r.choices[0].text), SUITE["enum"][0])


# -- the tiny model: errors, batching, the splitter ------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mlx_tune.model.loading import load_model
    from mlx_tune.server import build_app
    from mlx_tune.testing.tiny import save_tiny_folder

    folder = save_tiny_folder(tmp_path_factory.mktemp("tools") / "tiny")
    model, tokenizer, info = load_model(str(folder))
    app, _, _ = build_app(model, tokenizer, info, max_batch=4)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client, tokenizer


def ask(client, **body):
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "temperature": 0, **body}
    return client.post("/v1/chat/completions", json=body)


def test_tools_need_a_template_that_shows_them(tiny):
    client, _ = tiny
    r = ask(client, tools=TOOLS)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "--chat-template" in r.json()["error"]["message"]
    assert ask(client, tools=TOOLS, tool_choice="none").status_code == 200  # tools withheld: plain answer
    r = ask(client, tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_unenforceable_schema_is_a_400_naming_it(tiny):
    client, _ = tiny
    r = ask(client, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "format": "no-such-format"}}})
    assert r.status_code == 400 and "no-such-format" in r.json()["error"]["message"]


def test_constrained_and_free_rows_decode_together(tiny):
    client, tokenizer = tiny
    schema = {"type": "object", "properties": {"mood": {"enum": ["calm", "busy"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["mood", "n"], "additionalProperties": False}
    free = {"logit_bias": letter_bias(tokenizer), "max_tokens": 12}
    alone = ask(client, **free).json()["choices"][0]["message"]["content"]
    bodies = [dict(response_format={"type": "json_schema", "json_schema": {"name": "m", "schema": schema}},
                   temperature=1.0, seed=i) if i % 2 else free for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: ask(client, **b).json()["choices"][0], bodies))
    for i, a in enumerate(answers):
        if i % 2:
            jsonschema.validate(json.loads(a["message"]["content"]), schema)
        else:
            assert a["message"]["content"] == alone  # a free row is not touched by its neighbours' masks


def test_call_splitter_holds_markers_back():
    from mlx_tune.server.tools import GENERIC, CallSplitter, ToolSyntax

    fmt = ToolSyntax(GENERIC[0], GENERIC[1], lambda text, tools: json.loads(text), "json")
    s = CallSplitter(fmt)
    text = 'Sure. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> and <tool_ca'
    events = []
    for i in range(0, len(text), 3):  # arrives in 3-character pieces
        events += s.feed(text[i:i + 3])
    events += s.finish()
    content = "".join(v for k, v in events if k == "text")
    calls = [v for k, v in events if k == "call"]
    assert content == "Sure.  and <tool_ca"  # a held-back partial marker that never completes is text
    assert calls[0]["name"] == "add" and json.loads(calls[0]["arguments"]) == {"a": 1, "b": 2}
    s = CallSplitter(fmt)
    assert [k for k, _ in s.feed("<tool_call>not json</tool_call>")] == ["text"]


@pytest.mark.slow
def test_langchain_agent_completes_a_two_step_tool_task(demo):
    from tests.needs import missing

    try:
        from langchain_core.messages import HumanMessage, ToolMessage
        from langchain_core.tools import tool
        from langchain_openai import ChatOpenAI
    except ImportError:
        missing("langchain-openai is not installed (pip install -e '.[dev]')")
    _, url = demo

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model="base", temperature=0, max_tokens=64,
                     max_retries=0, timeout=300)
    question = HumanMessage("What is 17 plus 25? Use the add tool.")
    step1 = llm.bind_tools([add], tool_choice="required").invoke([question])  # step 1: the model calls the tool
    (call,) = step1.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    result = add.invoke(call["args"])
    final = llm.bind_tools([add]).invoke([question, step1, ToolMessage(str(result), tool_call_id=call["id"])])
    assert isinstance(final.content, str)  # step 2: it answers (or calls again) from the tool's result
    assert final.content or final.tool_calls


def test_openai_client_n_and_penalties(tiny):
    from openai import OpenAI

    client, tokenizer = tiny
    oa = OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
    bias = letter_bias(tokenizer, "ab")
    plain = oa.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
                                       temperature=0, logit_bias=bias)
    text = plain.choices[0].message.content
    assert text and set(text) <= set("ab")
    # A repeated letter is penalised more with each use: the greedy run of one letter breaks.
    other = oa.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=16, temperature=0, logit_bias=bias, frequency_penalty=2.0)
    assert other.choices[0].message.content != text and set(other.choices[0].message.content) <= set("ab")
    once = oa.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=16, temperature=0, logit_bias=bias, presence_penalty=2.0)
    assert set(once.choices[0].message.content) <= set("ab")
    many = oa.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                      temperature=1.0, seed=5, n=3, logit_bias=bias)
    assert [c.index for c in many.choices] == [0, 1, 2] and len({c.message.content for c in many.choices}) > 1


@pytest.mark.slow
def test_auto_tool_choice_lets_the_model_decide(demo):
    client, _ = demo
    r = client.chat.completions.create(model="base", temperature=0, max_tokens=64, tools=TOOLS, tool_choice="auto",
                                       messages=[{"role": "system", "content": "Call a tool when one fits."}] + ASK)
    choice = r.choices[0]
    if choice.message.tool_calls:  # a call the model chose to make parses like a forced one
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.function.name in SCHEMAS and json.loads(call.function.arguments) is not None
    else:
        assert choice.finish_reason in ("stop", "length") and "<tool_call>" not in (choice.message.content or "")
