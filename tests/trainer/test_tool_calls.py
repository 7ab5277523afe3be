"""Tool-call parsing (Qwen/Hermes tags, Llama 3 JSON) and execution into `tool` messages."""

from __future__ import annotations

import json

import pytest

from posttrain.trainer.tools.calls import (
    MalformedCall,
    ToolBox,
    ToolCall,
    count_tool_calls,
    parse_tool_calls,
)


def add(a: int, b: int) -> int:
    return a + b


def fail(reason: str) -> str:
    raise RuntimeError(reason)


def test_hermes_calls_in_order_with_text_around_them():
    text = (
        "Let me compute.\n<tool_call>\n"
        '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>{"name": "weather", "arguments": {"city": "Zürich"}}</tool_call><|im_end|>'
    )
    assert parse_tool_calls(text) == [
        ToolCall("add", {"a": 1, "b": 2}),
        ToolCall("weather", {"city": "Zürich"}),
    ]


def test_hermes_malformed_calls_are_reported_not_dropped():
    calls = parse_tool_calls(
        '<tool_call>{"name": "add", "arguments": {"a": 1,}}</tool_call>'
        '<tool_call>{"arguments": {}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>'
        '<tool_call>{"name": "add"'
    )
    assert [type(c) for c in calls] == [MalformedCall] * 4
    reasons = [c.reason for c in calls if isinstance(c, MalformedCall)]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1] == 'a tool call needs a "name" string'
    assert reasons[2] == '"arguments" of add must be a JSON object'
    assert reasons[3] == "<tool_call> is not closed"


def test_llama3_json_calls_with_and_without_python_tag():
    plain = '{"name": "add", "parameters": {"a": 3, "b": 4}}'
    assert parse_tool_calls(plain) == [ToolCall("add", {"a": 3, "b": 4})]
    tagged = (
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 1}}; ' + plain + "<|eom_id|>"
    )
    assert parse_tool_calls(tagged) == [
        ToolCall("add", {"a": 1, "b": 1}),
        ToolCall("add", {"a": 3, "b": 4}),
    ]
    # Arguments encoded as a JSON string (seen from fine-tuned models) are decoded.
    nested = json.dumps({"name": "add", "arguments": json.dumps({"a": 1, "b": 2})})
    assert parse_tool_calls(nested) == [ToolCall("add", {"a": 1, "b": 2})]


def test_prose_and_json_answers_are_not_calls():
    assert parse_tool_calls("The answer is 42.") == []
    assert parse_tool_calls('{"answer": 42}') == []  # JSON, but no tool name
    assert parse_tool_calls("{not json at all") == []
    assert count_tool_calls("no calls here") == 0


def test_python_tag_with_bad_json_is_malformed():
    calls = parse_tool_calls("<|python_tag|>print('hi')")
    assert len(calls) == 1 and isinstance(calls[0], MalformedCall)
    assert count_tool_calls("<|python_tag|>print('hi')") == 1


def test_toolbox_results_and_errors_become_tool_messages():
    box = ToolBox({"add": add, "fail": fail, "listing": lambda: {"files": ["a", "b"]}})
    text = (
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 5}}</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>'
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "fail", "arguments": {"reason": "disk"}}</tool_call>'
        '<tool_call>{"name": "listing", "arguments": {}}</tool_call>'
        "<tool_call>{oops}</tool_call>"
    )
    messages = box.run(text)
    assert [m["role"] for m in messages] == ["tool"] * 6
    assert [m["name"] for m in messages] == ["add", "add", "nope", "fail", "listing", "invalid"]
    contents = [m["content"] for m in messages]
    assert contents[0] == "7"
    assert contents[1].startswith("Error: bad arguments for add: missing a required argument")
    assert contents[2] == "Error: unknown tool 'nope'; available: add, fail, listing"
    assert contents[3] == "Error: fail raised RuntimeError: disk"
    assert json.loads(contents[4]) == {"files": ["a", "b"]}
    assert contents[5].startswith("Error: malformed tool call: not valid JSON")
    assert box.run("just an answer") == []


def test_toolbox_loads_functions_from_a_file_and_a_module(tmp_path):
    tools = tmp_path / "my_tools.py"
    tools.write_text("def shout(text: str) -> str:\n    return text.upper()\n")
    box = ToolBox.load([f"{tools}:shout", "posttrain.trainer.tools.sandbox:code_interpreter"])
    assert sorted(box.tools) == ["code_interpreter", "shout"]
    assert box.call(ToolCall("shout", {"text": "hi"})) == "HI"
    out = box.call(ToolCall("code_interpreter", {"code": "print(6 * 7)"}))
    assert out == "42\n"
    with pytest.raises(ValueError, match=r"tools\[0\]: cannot load .*missing"):
        ToolBox.load([f"{tools}:missing"])
    with pytest.raises(ValueError, match="already loaded"):
        ToolBox.load([f"{tools}:shout", f"{tools}:shout"])
