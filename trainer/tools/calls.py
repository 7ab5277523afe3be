"""Function calling: parse a model turn's tool calls, run the named Python callables, and format
the results as `tool` messages.

Formats parsed (what the families' chat templates teach their models to write):
- Qwen 2.5/3 and Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number
  per turn;
- Llama 3.1/3.2/3.3 JSON tool calls: `{"name": ..., "parameters": {...}}` as the whole turn,
  optionally after `<|python_tag|>`; several separated by `;` or whitespace. `"arguments"` is
  accepted in place of `"parameters"`.

A call that cannot be parsed (bad JSON, no name, arguments not an object, an unclosed
`<tool_call>`) is a `MalformedCall`; running it, like calling an unknown tool, with arguments the
function does not take, or a tool that raises, gives an `Error: ...` tool message for the model,
never an exception: a bad turn is something to learn from, not a reason to stop training.
Tools are named `"pkg.module:fn"` or `"/path/file.py:fn"` and run in the trainer's process (they
are the user's code, trusted); code the model writes belongs in `posttrain.trainer.tools.sandbox`.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.trainer.rewards import load_function

_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
# End-of-turn markers left in when a turn is decoded with special tokens.
_TRAILERS = ("<|eom_id|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class MalformedCall:
    text: str  # what the model wrote
    reason: str


def _from_json(obj: Any, text: str) -> ToolCall | MalformedCall:
    if not isinstance(obj, dict):
        return MalformedCall(text, f"a tool call is a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return MalformedCall(text, 'a tool call needs a "name" string')
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models JSON-encode the arguments a second time
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return MalformedCall(text, f'"arguments" of {name} must be a JSON object')
    return ToolCall(name, arguments)


def _hermes_calls(text: str) -> list[ToolCall | MalformedCall]:
    calls: list[ToolCall | MalformedCall] = []
    for match in _HERMES.finditer(text):
        body, closed = match.group(1).strip(), match.group(2)
        if not closed:
            calls.append(MalformedCall(match.group(0), "<tool_call> is not closed"))
            continue
        try:
            calls.append(_from_json(json.loads(body), body))
        except json.JSONDecodeError as err:
            calls.append(MalformedCall(body, f"not valid JSON: {err}"))
    return calls


def _json_calls(text: str, tagged: bool) -> list[ToolCall | MalformedCall]:
    """Llama 3's JSON calls: the whole text is one or more objects (split by ';' or spaces)."""
    decoder = json.JSONDecoder()
    calls: list[ToolCall | MalformedCall] = []
    pos = 0
    while pos < len(text):
        while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
            pos += 1
        if pos == len(text):
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            if not tagged and not calls:
                return []  # plain prose that happens to start with '{': not a call
            return [*calls, MalformedCall(text[pos:], f"not valid JSON: {err}")]
        call = _from_json(obj, json.dumps(obj))
        if isinstance(call, MalformedCall) and not tagged and not calls:
            return []  # an untagged JSON answer without a name is an answer, not a call
        calls.append(call)
    return calls


def parse_tool_calls(text: str) -> list[ToolCall | MalformedCall]:
    """Every tool call in a model turn, in order (Hermes/Qwen tags first, else Llama 3 JSON)."""
    stripped = text.strip()
    for trailer in _TRAILERS:
        stripped = stripped.removesuffix(trailer).rstrip()
    if "<tool_call>" in stripped:
        return _hermes_calls(stripped)
    if _PYTHON_TAG in stripped:
        return _json_calls(stripped.split(_PYTHON_TAG, 1)[1], tagged=True)
    if stripped.startswith("{"):
        return _json_calls(stripped, tagged=False)
    return []


def count_tool_calls(text: str) -> int:
    """How many calls (well-formed or not) the turn attempts."""
    return len(parse_tool_calls(text))


# --------------------------------------------------------------------------- running them


def _format_result(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


class ToolBox:
    """Named callables and the messages their results become."""

    def __init__(self, tools: Mapping[str, Callable[..., Any]]):
        self.tools = dict(tools)

    @classmethod
    def load(cls, refs: Sequence[str]) -> ToolBox:
        """`["pkg.mod:fn", "/path/tools.py:search"]`; each tool is called by its function name."""
        tools: dict[str, Callable[..., Any]] = {}
        for i, ref in enumerate(refs):
            try:
                fn = load_function(ref)
            except Exception as err:
                raise ValueError(
                    f"tools[{i}]: cannot load {ref!r}: {type(err).__name__}: {err}"
                ) from err
            name = ref.rpartition(":")[2]
            if name in tools:
                raise ValueError(f"tools[{i}]: a tool named {name!r} is already loaded")
            tools[name] = fn
        return cls(tools)

    def call(self, call: ToolCall | MalformedCall) -> str:
        """The tool's result as text, or an `Error: ...` observation."""
        if isinstance(call, MalformedCall):
            return f"Error: malformed tool call: {call.reason}"
        fn = self.tools.get(call.name)
        if fn is None:
            known = ", ".join(sorted(self.tools)) or "none"
            return f"Error: unknown tool {call.name!r}; available: {known}"
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as err:
            return f"Error: bad arguments for {call.name}: {err}"
        except ValueError:  # no signature to check (some builtins): let the call decide
            pass
        try:
            return _format_result(fn(**call.arguments))
        except Exception as err:
            return f"Error: {call.name} raised {type(err).__name__}: {err}"

    def run(self, text: str) -> list[dict[str, str]]:
        """One `tool` message per call in the turn (none when it makes no calls)."""
        messages = []
        for call in parse_tool_calls(text):
            name = call.name if isinstance(call, ToolCall) else "invalid"
            messages.append({"role": "tool", "name": name, "content": self.call(call)})
        return messages
