"""Request validation and the OpenRLHF remote-RM protocol, as pure functions (no HTTP, no device).

``POST /get_reward`` is what OpenRLHF's remote reward client sends
(``openrlhf/utils/remote_rm_utils.py`` and the agent executors)::

    {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [...]}

and it reads ``rewards`` (required), ``scores`` and ``extra_logs`` back. ``query[i]`` is the
decoded prompt plus response (special tokens kept), ``prompts[i]`` the prompt as the policy saw
it (usually already chat-templated). The response is ``query[i]`` with ``prompts[i]`` removed
from its front and trailing end-of-text markers stripped; the problem the RM sees is the content
of the last user turn of a ChatML prompt (the reference's RM input has no system message), or
the whole prompt when it has no ChatML markers (``prompt_format="auto"``). ``labels`` are
accepted and ignored: the RM is execution-free. Older clients send only ``query``; the prompt is
then everything up to the last ChatML assistant header.

``POST /score`` is the native form: ``{"items": [{"problem": str, "response": str}, ...]}``
(the response goes through the training extractor) or ``{"problem", "code"}`` items (the code is
scored as given).

A body is parsed and type-checked in one pass by pydantic (`GetRewardRequest`, `ScoreRequest`;
pydantic-core's JSON parser also stops at a fixed nesting depth), then checked against the
server's `Limits`. Every violation raises `RequestError` with an HTTP status and a message that
names the field.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

CHATML_USER = "<|im_start|>user\n"
CHATML_END = "<|im_end|>"
CHATML_ASSISTANT = "<|im_start|>assistant\n"
PROMPT_FORMATS = ("auto", "chatml", "raw")
_M = TypeVar("_M", bound=BaseModel)


class RequestCounts:
    """Requests answered and refused (by HTTP status) since start, for /health; thread-safe.
    Shared by both front ends (``serving.server``, ``serving.asgi``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ok = 0
        self._errors: dict[int, int] = {}
        self._started = time.time()

    def ok(self) -> None:
        with self._lock:
            self._ok += 1

    def error(self, status: int) -> None:
        with self._lock:
            self._errors[status] = self._errors.get(status, 0) + 1

    def snapshot(self, connections: int, closed: dict[str, int]) -> dict[str, Any]:
        """The /health counters, with the front end's own connection figures."""
        with self._lock:
            return {
                "requests_ok": self._ok,
                "requests_refused": {str(k): v for k, v in sorted(self._errors.items())},
                "connections": connections,
                "connections_closed": dict(closed),
                "uptime_s": round(time.time() - self._started, 1),
            }


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP status (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what one request may carry.

    Attributes:
        max_body_bytes: largest accepted Content-Length (checked before the body is read).
        max_items: most items (queries / score items) per request.
        max_chars: longest accepted string (problem, response, query or prompt), in characters.
    """

    max_body_bytes: int = 8 << 20
    max_items: int = 256
    max_chars: int = 200_000


@dataclasses.dataclass(frozen=True)
class Item:
    """One thing to score: the problem text and either a raw response (to extract code from)
    or ready code (``is_code``)."""

    problem: str
    text: str
    is_code: bool = False


class GetRewardRequest(BaseModel):
    """OpenRLHF's ``/get_reward`` body. Unknown fields are ignored (clients add their own)."""

    model_config = ConfigDict(extra="ignore")
    query: list[StrictStr]
    prompts: list[StrictStr] | None = None
    labels: list[Any] | None = None


class ScoreItem(BaseModel):
    """One ``/score`` item: a problem and exactly one of a response or ready code."""

    model_config = ConfigDict(extra="ignore")
    problem: StrictStr
    response: StrictStr | None = None
    code: StrictStr | None = None


class ScoreRequest(BaseModel):
    """The native ``/score`` body."""

    model_config = ConfigDict(extra="ignore")
    items: list[ScoreItem]


def _path(loc: Sequence[str | int]) -> str:
    """``("items", 0, "problem")`` -> ``items[0].problem``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_KINDS = {"list_type": "a list", "string_type": "a string", "model_type": "an object",
          "dict_type": "an object"}


def _request_error(e: ValidationError, body: Any) -> RequestError:
    """The first validation error as a 400 whose message names the field."""
    err = e.errors(include_url=False)[0]
    kind, loc, got = err["type"], err["loc"], err.get("input")
    if kind == "json_invalid":
        if isinstance(body, bytes | bytearray):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as u:
                return RequestError(400, f"body is not UTF-8: {u.reason} at byte {u.start}")
        msg = err["msg"].removeprefix("Invalid JSON: ")
        if "recursion limit" in msg:
            # The parser stops at a fixed depth: a body of 100k "[" is a 400, not a crash.
            return RequestError(400, "body is not valid JSON: nested too deeply")
        return RequestError(400, f"body is not valid JSON: {msg}")
    if not loc:
        return RequestError(400, f"body must be a JSON object, got {_json_type(got)}")
    where = _path(loc)
    if kind == "missing":
        return RequestError(400, f"missing field {where!r}")
    if kind in _KINDS:
        return RequestError(400, f"{where} must be {_KINDS[kind]}, got {_json_type(got)}")
    return RequestError(400, f"{where}: {err['msg']}")


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _validate(model: type[_M], data: bytes | dict[str, Any]) -> _M:
    """``model`` from a raw body (parsed and validated in one pass by pydantic-core) or from
    an already-decoded dict."""
    try:
        if isinstance(data, bytes | bytearray):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as e:
        raise _request_error(e, data) from None


def _check_strings(key: str, v: list[str], limits: Limits) -> list[str]:
    if len(v) > limits.max_items:
        raise RequestError(413, f"field {key!r} has {len(v)} items; limit is {limits.max_items}")
    for i, s in enumerate(v):
        if len(s) > limits.max_chars:
            raise RequestError(
                413, f"{key}[{i}] has {len(s)} characters; limit is {limits.max_chars}"
            )
    return v


def problem_from_prompt(prompt: str, prompt_format: str = "auto") -> str:
    """The RM's user turn from the policy's prompt.

    ``chatml``: the content of the last ``<|im_start|>user`` turn (error if there is none);
    ``raw``: the prompt itself; ``auto``: ``chatml`` when the marker is present, else ``raw``.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    start = prompt.rfind(CHATML_USER)
    if start < 0:
        if prompt_format == "chatml":
            raise RequestError(400, "prompt has no '<|im_start|>user' turn (prompt_format=chatml)")
        return prompt
    if prompt_format == "raw":
        return prompt
    start += len(CHATML_USER)
    end = prompt.find(CHATML_END, start)
    return prompt[start:] if end < 0 else prompt[start:end]


def response_from_query(query: str, prompt: str, end_markers: Sequence[str] = ()) -> str | None:
    """``query`` without its leading ``prompt`` and trailing ``end_markers``; None when the
    prompt is not found in the query."""
    if query.startswith(prompt):
        resp = query[len(prompt) :]
    else:
        # Tolerate text before the prompt (e.g. a BOS string the decoder kept).
        at = query.find(prompt) if prompt else 0
        if at < 0:
            return None
        resp = query[at + len(prompt) :]
    stripped = True
    while stripped:
        stripped = False
        resp = resp.rstrip()
        for m in end_markers:
            if m and resp.endswith(m):
                resp = resp[: -len(m)]
                stripped = True
    return resp


def split_chatml_query(query: str, index: int = 0) -> str:
    """The prompt part of a ChatML ``query`` (up to and including the last assistant header),
    for clients that send no ``prompts`` (older OpenRLHF versions)."""
    at = query.rfind(CHATML_ASSISTANT)
    if at < 0:
        raise RequestError(
            400, f"missing field 'prompts', and query[{index}] has no ChatML assistant turn to "
            "split at"
        )
    return query[: at + len(CHATML_ASSISTANT)]


def parse_get_reward(
    data: bytes | dict[str, Any],
    limits: Limits,
    *,
    prompt_format: str = "auto",
    end_markers: Sequence[str] = (),
) -> list[Item]:
    """Items of an OpenRLHF ``/get_reward`` request, from its raw body or its decoded dict
    (see the module docstring)."""
    req = _validate(GetRewardRequest, data)
    queries = _check_strings("query", req.query, limits)
    if req.prompts is None:
        prompts = [split_chatml_query(q, i) for i, q in enumerate(queries)]
    else:
        prompts = _check_strings("prompts", req.prompts, limits)
    if len(prompts) != len(queries):
        raise RequestError(
            400, f"'prompts' has {len(prompts)} items but 'query' has {len(queries)}"
        )
    if req.labels is not None and len(req.labels) != len(queries):
        raise RequestError(400, "'labels', when given, must be a list as long as 'query'")
    items = []
    for i, (q, p) in enumerate(zip(queries, prompts)):
        resp = response_from_query(q, p, end_markers)
        if resp is None:
            raise RequestError(400, f"query[{i}] does not contain prompts[{i}]")
        items.append(Item(problem_from_prompt(p, prompt_format), resp))
    return items


def parse_score(data: bytes | dict[str, Any], limits: Limits) -> list[Item]:
    """Items of a native ``/score`` request: ``{"items": [{"problem", "response"|"code"}]}``,
    from its raw body or its decoded dict."""
    req = _validate(ScoreRequest, data)
    if len(req.items) > limits.max_items:
        raise RequestError(
            413, f"'items' has {len(req.items)} entries; limit is {limits.max_items}")
    items = []
    for i, it in enumerate(req.items):
        has_resp, has_code = it.response is not None, it.code is not None
        if has_resp == has_code:
            raise RequestError(400, f"items[{i}] needs exactly one of 'response' and 'code'")
        name, text = ("response", it.response) if has_resp else ("code", it.code)
        for field, v in (("problem", it.problem), (name, text)):
            if len(v) > limits.max_chars:
                raise RequestError(
                    413, f"items[{i}].{field} has {len(v)} characters; limit is {limits.max_chars}"
                )
        items.append(Item(it.problem, text, is_code=has_code))
    return items
