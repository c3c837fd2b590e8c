"""Generative versions (ONNX Runtime GenAI): their platform, fixed signature and request parameters.

A bundle holding ``genai_config.json`` at its top level is a generative language model: the
registry validates it with onnxruntime-genai, workers run it token by token
(``services.inference.generation``) and the gateway streams the tokens
(``services.gateway.generation``). Its signature is fixed: one prompt in, the text out, batch 1.

Tokens travel on the gateway's reply stream as partial replies (``services.common.queue.Reply``
with ``seq`` >= 0): one per token, in order, each with the delivery (``attempt``) of the queue
entry that produced it; the last one is ``final`` and carries the finish reason and the whole
response (what ModelInfer returns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.common.metadata import TensorSpec

PLATFORM = "onnxruntime_genai"
"""``Version.platform`` of a generative version."""
CONFIG_FILE = "genai_config.json"
"""The file whose presence at a bundle's top level makes it generative."""
PROMPT = "prompt"
TEXT = "text"
INPUTS = (TensorSpec(name=PROMPT, datatype="BYTES", shape=(1,)),)
"""The prompt: one UTF-8 string (batch 1: one generation per request)."""
OUTPUTS = (TensorSpec(name=TEXT, datatype="BYTES", shape=(1,)),)
"""The generated text: one UTF-8 string (a piece of it in each streamed response)."""
EMPTY_FINAL = "triton_enable_empty_final_response"
"""Triton's request parameter (tritonclient's ``enable_empty_final_response``): end with an empty final response."""
FINAL = "triton_final_response"
"""Triton's response parameter marking a decoupled model's last response."""
DEFAULT_MAX_NEW_TOKENS = 128
"""Tokens generated when a request does not set ``max_new_tokens`` (capped by the gateway's limit)."""

FINISH_REASON = "finish_reason"
"""The (string) response parameter that says why a generation ended: on the last streamed response and on
ModelInfer's whole answer."""
FINISH_LENGTH = "length"
"""Finish reason: ``max_new_tokens`` (or the model's context length) reached."""
FINISH_STOP = "stop"
"""Finish reason: the model produced its end-of-sequence token."""
FINISH_CANCELLED = "cancelled"
"""Finish reason: the caller went away (cancelled, disconnected or past its deadline)."""

_KINDS = {
    "max_new_tokens": ("int64_param", "uint64_param"),
    "temperature": ("double_param",),
    "top_k": ("int64_param", "uint64_param"),
    "top_p": ("double_param",),
    "seed": ("int64_param", "uint64_param"),
    "do_sample": ("bool_param",),
    EMPTY_FINAL: ("bool_param",),
}
_SAMPLING = ("temperature", "top_k", "top_p")
"""The parameters of sampling (``do_sample``); setting one samples unless ``do_sample`` is false (refused)."""
ALLOWED = tuple(_KINDS)
"""The request parameters a generative model takes."""

TypedParameter = tuple[str, str | None, object]
"""A request parameter: its name, its kind (``int64_param``, ``double_param``, ...; None: unset) and value."""


@dataclass(frozen=True)
class GenerationParams:
    """How to generate: the request's parameters, checked, with their defaults."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    """Sample (with temperature, top-k, top-p) instead of greedy decoding; set when one of those is."""
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    """Random seed of sampling: a seeded generation is reproducible (and resumable)."""
    empty_final: bool = False
    """End the stream with an empty response marked final (Triton's ``enable_empty_final_response``)."""

    @property
    def is_deterministic(self) -> bool:
        """Whether a second run gives the same tokens: greedy, or sampling with a seed."""
        return not self.do_sample or self.seed is not None

    def search_options(self, prompt_tokens: int) -> dict[str, bool | int | float]:
        """The onnxruntime-genai search options for a prompt of ``prompt_tokens`` tokens."""
        options: dict[str, bool | int | float] = {
            "max_length": prompt_tokens + self.max_new_tokens,
            "do_sample": self.do_sample,
        }
        if self.do_sample:
            for name in ("temperature", "top_k", "top_p"):
                value = getattr(self, name)
                if value is not None:
                    options[name] = value
            if self.seed is not None:
                options["random_seed"] = self.seed
        return options


def _value(name: str, kind: str | None, value: object) -> float:
    if kind not in _KINDS[name] or not isinstance(value, int | float):
        expected = " or ".join(_KINDS[name])
        raise InvalidArgument(f"parameter '{name}' must be a {expected}, got {kind or 'no value'}")
    return value


def _checked(name: str, value: float, is_ok: bool, rule: str) -> None:
    if not is_ok:
        raise InvalidArgument(f"parameter '{name}' must be {rule}, got {value}")


def _optional(values: dict[str, float], name: str, rule: str, is_ok: Callable[[float], bool]) -> float | None:
    value = values.get(name)
    if value is not None:
        _checked(name, value, is_ok(value), rule)
    return value


def _do_sample(values: dict[str, float]) -> bool:
    """``do_sample`` as given; when not given, whether a sampling parameter is (they would do nothing greedy)."""
    sampling = [name for name in _SAMPLING if name in values]
    if "do_sample" not in values:
        return bool(sampling)
    if sampling and not values["do_sample"]:
        raise InvalidArgument(
            f"parameter '{sampling[0]}' needs do_sample true: greedy decoding takes no {', '.join(_SAMPLING)}"
        )
    return bool(values["do_sample"])


def parse_parameters(parameters: Iterable[TypedParameter], max_new_tokens_cap: int) -> GenerationParams:
    """Check a generation request's parameters and fill in the defaults.

    Args:
        parameters: The request's parameters.
        max_new_tokens_cap: The largest ``max_new_tokens`` allowed (the default is capped by it too).

    Raises:
        InvalidArgument: An unknown parameter (the message lists the allowed ones), or one of the
            wrong kind or out of its range (the message names it and the rule), or a sampling
            parameter with ``do_sample`` false.
    """
    values: dict[str, float] = {}
    for name, kind, value in parameters:
        if name not in _KINDS:
            raise InvalidArgument(
                f"parameter '{name}' is not supported by generative models; they take {', '.join(ALLOWED)}"
            )
        values[name] = _value(name, kind, value)
    max_new = int(values.get("max_new_tokens", min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens_cap)))
    _checked("max_new_tokens", max_new, 1 <= max_new <= max_new_tokens_cap, f"1..{max_new_tokens_cap}")
    temperature = _optional(values, "temperature", "> 0", lambda v: v > 0)
    top_k = _optional(values, "top_k", ">= 0", lambda v: v >= 0)
    top_p = _optional(values, "top_p", "in (0, 1]", lambda v: 0 < v <= 1)
    seed = _optional(values, "seed", "an int64", lambda v: -(2**63) <= v < 2**63)
    return GenerationParams(
        max_new_tokens=max_new,
        do_sample=_do_sample(values),
        temperature=temperature,
        top_k=None if top_k is None else int(top_k),
        top_p=top_p,
        seed=None if seed is None else int(seed),
        empty_final=bool(values.get(EMPTY_FINAL, False)),
    )


def is_generative(platform: str) -> bool:
    """Whether a version of this platform is a generative model."""
    return platform == PLATFORM
