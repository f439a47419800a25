"""rank_llm 0.25.7 itself, loaded without the package ``__init__`` files that import vLLM.

``rank_llm/rerank/listwise/__init__.py`` (and ``rank_llm/rerank/__init__.py``) import vLLM and the API
clients; the prompt code does not. The parent packages are registered as bare namespace modules pointing at
the installed folders, so ``rank_llm.data``, the inference handlers and ``rank_listwise_os_llm`` (whose
top-level ``import vllm`` gets an empty stand-in: only its prompt and logits methods are called) load
from the wheel unchanged.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest


@functools.cache
def rank_llm_root() -> Path:
    spec = importlib.util.find_spec("rank_llm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("rank-llm is not installed (pip install --no-deps rank-llm==0.25.7; make setup does it)")
    return Path(next(iter(spec.submodule_search_locations)))


def _package(name: str, folder: Path) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module


@functools.cache
def rank_llm() -> types.SimpleNamespace:
    """The rank_llm modules the tests call, from the installed wheel."""
    root = rank_llm_root()
    _package("rank_llm", root)
    _package("rank_llm.rerank", root / "rerank")
    _package("rank_llm.rerank.listwise", root / "rerank" / "listwise")
    if "vllm" not in sys.modules:  # only for rank_listwise_os_llm's module-level import and annotations
        stub = types.ModuleType("vllm")
        stub.RequestOutput = stub.LLM = stub.SamplingParams = object  # type: ignore[attr-defined]
        sys.modules["vllm"] = stub
    handler = types.ModuleType("rank_llm.rerank.vllm_handler")
    handler.VllmHandler = object  # type: ignore[attr-defined]
    sys.modules.setdefault("rank_llm.rerank.vllm_handler", handler)
    return types.SimpleNamespace(
        data=importlib.import_module("rank_llm.data"),
        single=importlib.import_module("rank_llm.rerank.listwise.singleturn_listwise_inference_handler"),
        multi=importlib.import_module("rank_llm.rerank.listwise.multiturn_listwise_inference_handler"),
        os_llm=importlib.import_module("rank_llm.rerank.listwise.rank_listwise_os_llm"),
        templates=root / "rerank" / "prompt_templates",
    )


def template(name: str) -> dict[str, str]:
    """A template yaml of the wheel, as rank_llm reads it."""
    import yaml

    return yaml.safe_load((rank_llm().templates / f"{name}.yaml").read_text())


class ListwiseOSLLM:
    """The parts of rank_llm's RankListwiseOSLLM a prompt needs, with its own methods bound to this object
    (``create_prompt``, ``num_output_tokens``, ``get_num_tokens``, ``_evaluate_logits``)."""

    def __init__(
        self, template_name: str, tokenizer: Any, *, use_alpha: bool, context_size: int = 4096
    ) -> None:
        r = rank_llm()
        data = template(template_name)
        handler = r.single.SingleTurnListwiseInferenceHandler
        if data["method"] == "multiturn_listwise":
            handler = r.multi.MultiTurnListwiseInferenceHandler
        self._inference_handler = handler(data)
        self._tokenizer = tokenizer
        self._use_alpha = use_alpha
        self._num_few_shot_examples = 0
        self._examples: list[Any] = []
        self._is_thinking = False
        self._context_size = context_size
        self._window_size = 20
        self._output_token_estimate = None
        cls = r.os_llm.RankListwiseOSLLM
        for name in ("create_prompt", "num_output_tokens", "get_num_tokens", "_evaluate_logits"):
            setattr(self, name, getattr(cls, name).__get__(self))

    def max_tokens(self) -> int:
        return self._context_size

    def result(self, query: str, passages: list[str]) -> Any:
        d = rank_llm().data
        return d.Result(
            query=d.Query(text=query, qid="q"),
            candidates=[
                d.Candidate(docid=str(i), score=1.0, doc={"contents": p}) for i, p in enumerate(passages)
            ],
        )
