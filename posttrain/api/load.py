"""Reading PostTrainJob manifests and turning pydantic's errors into ones a user can act on.

Every error names the field as the user wrote it (`spec.training.batchSize`,
`spec.grpo.rewards[0].builtin`) and says what is allowed. A misspelt field is named as written,
with the closest allowed name.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.api.v1alpha1 import FieldValueError, PostTrainJob


@dataclass(frozen=True)
class FieldError:
    path: str  # e.g. spec.training.steps
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class JobInvalid(ValueError):
    """A manifest that is not a valid PostTrainJob; `errors` lists every problem at once."""

    def __init__(self, errors: list[FieldError], source: str = ""):
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(str(e) for e in errors))


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """All YAML documents of a file ('-' is stdin), skipping empty ones."""
    text = Path("/dev/stdin").read_text() if str(path) == "-" else Path(path).read_text()
    return parse_documents(text, source=str(path))


def parse_documents(text: str, source: str = "") -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise JobInvalid([FieldError("", f"not valid YAML: {err}")], source) from err
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise JobInvalid(
                [FieldError("", f"document {i + 1} is a {type(doc).__name__}, not a mapping")],
                source,
            )
    return docs


def parse_job(manifest: dict[str, Any], source: str = "") -> PostTrainJob:
    """Validate one manifest; raise JobInvalid naming every bad field."""
    try:
        return PostTrainJob.model_validate(manifest)
    except ValidationError as err:
        raise JobInvalid(field_errors(err), source) from None


def field_errors(err: ValidationError) -> list[FieldError]:
    out: list[FieldError] = []
    for e in err.errors():
        loc = list(e["loc"])
        ctx = e.get("ctx") or {}
        cause = ctx.get("error")
        message = str(cause) if isinstance(cause, ValueError) else e["msg"]
        if isinstance(cause, FieldValueError):
            loc.append(cause.field)
        if e["type"] == "extra_forbidden":
            message = _unknown_field_message(loc)
        elif e["type"] == "missing":
            message = "required field is missing"
        elif (
            "input" in e
            and e["type"] not in ("value_error", "assertion_error")
            and not isinstance(e["input"], dict)
        ):
            message = f"{message} (got {e['input']!r})"
        out.append(FieldError(_format_loc(loc), message))
    return _dedupe(out)


def _format_loc(loc: Iterable[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _unknown_field_message(loc: list[Any]) -> str:
    written = str(loc[-1])
    renamed = getattr(_model_at(PostTrainJob, loc[:-1]), "renamed", {})
    if written in renamed:
        return f"{written!r} was renamed: write {renamed[written]!r} instead"
    allowed = _fields_at(PostTrainJob, loc[:-1])
    if not allowed:
        return f"unknown field {written!r}"
    close = difflib.get_close_matches(written, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field {written!r}{hint} (allowed: {', '.join(allowed)})"


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """The YAML names of the fields of the object found at `loc` below `model`."""
    sub = _model_at(model, loc)
    if sub is None:
        return []
    return [f.alias or name for name, f in sub.model_fields.items()]


def _model_at(model: type[BaseModel], loc: list[Any]) -> type[BaseModel] | None:
    """The pydantic model of the object found at `loc` below `model` (None: not an object)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue  # list index: the element type was already unwrapped
        sub = _model_of(current)
        if sub is None:
            return None
        field = next((f for name, f in sub.model_fields.items() if (f.alias or name) == part), None)
        if field is None:
            return None
        current = field.annotation
    return _model_of(current)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """Unwrap Optional / list / Annotated to the pydantic model inside, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _dedupe(errors: list[FieldError]) -> list[FieldError]:
    seen: set[tuple[str, str]] = set()
    out = []
    for e in errors:
        key = (e.path, e.message)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out
