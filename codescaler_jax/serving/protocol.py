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

Every violation raises `RequestError` with an HTTP status and a message that names the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

CHATML_USER = "<|im_start|>user\n"
CHATML_END = "<|im_end|>"
CHATML_ASSISTANT = "<|im_start|>assistant\n"
PROMPT_FORMATS = ("auto", "chatml", "raw")


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


def parse_json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(400, f"body is not UTF-8: {e.reason} at byte {e.start}") from e
    except json.JSONDecodeError as e:
        raise RequestError(400, f"body is not valid JSON: {e.msg} (char {e.pos})") from e
    except RecursionError:
        # json.loads recurses once per nesting level; a body of 100k "[" must be a 400, not
        # a 500 from inside the parser.
        raise RequestError(400, "body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(data).__name__}")
    return data


def _string_list(data: dict[str, Any], key: str, limits: Limits) -> list[str]:
    v = data.get(key)
    if v is None:
        raise RequestError(400, f"missing field {key!r} (a list of strings)")
    if not isinstance(v, list):
        raise RequestError(400, f"field {key!r} must be a list of strings, got {type(v).__name__}")
    if len(v) > limits.max_items:
        raise RequestError(413, f"field {key!r} has {len(v)} items; limit is {limits.max_items}")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise RequestError(400, f"{key}[{i}] must be a string, got {type(s).__name__}")
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
    data: dict[str, Any],
    limits: Limits,
    *,
    prompt_format: str = "auto",
    end_markers: Sequence[str] = (),
) -> list[Item]:
    """Items of an OpenRLHF ``/get_reward`` request (see the module docstring)."""
    queries = _string_list(data, "query", limits)
    if data.get("prompts") is None:
        prompts = [split_chatml_query(q, i) for i, q in enumerate(queries)]
    else:
        prompts = _string_list(data, "prompts", limits)
    if len(prompts) != len(queries):
        raise RequestError(
            400, f"'prompts' has {len(prompts)} items but 'query' has {len(queries)}"
        )
    labels = data.get("labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(queries)):
        raise RequestError(400, "'labels', when given, must be a list as long as 'query'")
    items = []
    for i, (q, p) in enumerate(zip(queries, prompts)):
        resp = response_from_query(q, p, end_markers)
        if resp is None:
            raise RequestError(400, f"query[{i}] does not contain prompts[{i}]")
        items.append(Item(problem_from_prompt(p, prompt_format), resp))
    return items


def parse_score(data: dict[str, Any], limits: Limits) -> list[Item]:
    """Items of a native ``/score`` request: ``{"items": [{"problem", "response"|"code"}]}``."""
    raw = data.get("items")
    if not isinstance(raw, list):
        raise RequestError(400, "field 'items' must be a list of objects")
    if len(raw) > limits.max_items:
        raise RequestError(413, f"'items' has {len(raw)} entries; limit is {limits.max_items}")
    items = []
    for i, it in enumerate(raw):
        if not isinstance(it, dict):
            raise RequestError(400, f"items[{i}] must be an object")
        problem = it.get("problem")
        has_resp, has_code = "response" in it, "code" in it
        if has_resp == has_code:
            raise RequestError(400, f"items[{i}] needs exactly one of 'response' and 'code'")
        text = it["response" if has_resp else "code"]
        for name, v in (("problem", problem), ("response" if has_resp else "code", text)):
            if not isinstance(v, str):
                raise RequestError(400, f"items[{i}].{name} must be a string")
            if len(v) > limits.max_chars:
                raise RequestError(
                    413, f"items[{i}].{name} has {len(v)} characters; limit is {limits.max_chars}"
                )
        items.append(Item(problem, text, is_code=has_code))
    return items
