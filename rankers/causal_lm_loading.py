"""Loading the causal LM an LLM reranker names: settings, GGUF unpacking, low-rank glue, sharing.

Models: a Hugging Face id or folder, a ``.gguf`` file, or the packaged SmolLM2-135M-Instruct
(``"smollm2"`` / ``"HuggingFaceTB/SmolLM2-135M-Instruct"``). A hub id whose local folder (under
``$STREAMRANK_MODELS`` or ``cache_home()/models``) holds one ``.gguf`` file and no ``config.json`` loads
that file (``Qwen/Qwen2.5-Coder-0.5B-Instruct`` as the model fetch script lays it out). A GGUF model is unpacked once
(about 20 s) and saved as safetensors under ``cache_home()/models/<name>``; later loads read that copy.
``lowrank = {...}`` compresses the loaded model through :mod:`streamrank.kernels.lowrank`. One model
per settings and device is shared by every stage of a pipeline (:func:`shared_llm`).
torch and transformers are imported only when a model is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from streamrank.errors import ConfigError
from streamrank.rankers.causal_lm import CausalLM

if TYPE_CHECKING:
    from streamrank.context import PipelineContext

log = logging.getLogger(__name__)


class LowRankOptions(BaseModel):
    """``lowrank = {ratio = 0.5, backend = "auto"}``: replace linear layers by SVD factors (kernels/).

    ``lowrank = {factors = "DIR"}`` loads factors stored by ``streamrank compress`` instead (healed or not;
    no decomposition at load). With the fused backends attention runs on the rank-space KV cache.
    """

    model_config = ConfigDict(extra="allow")

    ratio: float | None = Field(0.5, gt=0.0)
    """Fraction of each layer's parameters kept (other keys, e.g. ``energy``, ``calibration``, go to the kernels package)."""
    backend: str = "auto"


class LLMSettings(BaseModel):
    """The ``[stages.llm]`` block every LLM stage accepts."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "smollm2"
    """Hugging Face id, local folder, ``.gguf`` file, or ``smollm2`` (the packaged GGUF)."""
    max_passage_tokens: int = Field(100, ge=4)
    """Passages are cut to this many tokens (the prompt's fixed parts never are)."""
    max_query_tokens: int = Field(64, ge=4)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str | None = None
    """Default: the pipeline's device, else CUDA when available, else CPU."""
    lowrank: LowRankOptions | None = None

    def cache_key(self, device: str) -> tuple[Any, ...]:
        """What identifies one loaded model (passage/query limits do not)."""
        lowrank = self.lowrank.model_dump_json() if self.lowrank else None
        return ("causal-lm", self.model, self.dtype, device, lowrank)


def resolve_device(settings: LLMSettings, context_device: str | None = None) -> str:
    if settings.device or context_device:
        return str(settings.device or context_device)
    from streamrank.models import default_device

    return default_device()


def load_causal_lm(settings: LLMSettings, device: str | None = None) -> CausalLM:
    """Load the model ``settings.model`` names (see the module docstring), apply low-rank if asked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamrank.models import SMOLLM2, is_smollm2, resolve_model, smollm2_gguf_path

    dtype = getattr(torch, settings.dtype)
    device = device or resolve_device(settings)
    name = settings.model
    gguf: Path | None = None
    if is_smollm2(name):
        gguf, name = smollm2_gguf_path(), SMOLLM2
    elif name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.exists():
            raise ConfigError(f"GGUF file {name!r} not found")
    else:
        gguf = gguf_in_folder(name)
    # a hub id is looked up in the local model folders first; offline and absent: ModelNotFoundError naming
    # `make models` and the hub
    source = str(unpacked_gguf(gguf)) if gguf is not None else resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise ConfigError(f"cannot load causal LM {settings.model!r}: {exc}") from exc
    model.to(device).eval()
    if settings.lowrank is not None:
        model = apply_lowrank_options(model, settings.lowrank, tokenizer)
    return CausalLM(model, tokenizer, name)


def gguf_in_folder(name: str) -> Path | None:
    """The one ``.gguf`` file of the local model folder of hub id ``name``, when that folder has no config."""
    from streamrank.models import model_folders

    for folder in [Path(name).expanduser()] + [root / name for root in model_folders()]:
        if folder.is_dir() and not (folder / "config.json").exists():
            files = sorted(folder.glob("*.gguf"))
            if len(files) > 1:
                raise ConfigError(f"{folder} holds {len(files)} .gguf files; name one of them as the model")
            if files:
                return files[0]
    return None


def unpacked_gguf(gguf: Path) -> Path:
    """A safetensors copy of ``gguf`` under ``cache_home()/models``, made on first use (about 20 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamrank.models import cache_home

    stat = gguf.stat()
    tag = hashlib.sha1(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:10]
    target = cache_home() / "models" / f"{gguf.stem}-{tag}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    log.info("unpacking %s into %s (once)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a model that still carries its GGUF quantizer; the weights are
    # already de-quantized to fp32, so dropping the quantizer and its config loses nothing.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp{time.monotonic_ns()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)
    return target


def lowrank_module() -> Any | None:
    """``streamrank.kernels.lowrank`` if it is installed and provides ``apply_lowrank``."""
    try:
        from streamrank.kernels import lowrank
    except ImportError:
        return None
    return lowrank if callable(getattr(lowrank, "apply_lowrank", None)) else None


def apply_lowrank_options(model: Any, options: LowRankOptions, tokenizer: Any = None) -> Any:
    """Replace the model's linear layers by low-rank factors through the kernels package.

    ``tokenizer`` is what calibrated (activation-aware) compression tokenizes its texts with.
    """
    module = lowrank_module()
    if module is None:
        raise ConfigError(
            "lowrank is set but streamrank.kernels.lowrank.apply_lowrank is not available in this build; "
            "remove `lowrank` from the llm settings"
        )
    raw = options.model_dump(exclude_unset=True)
    settings_cls = getattr(module, "LowRankSettings", None)
    try:
        if settings_cls is not None:  # the kernels package validates its own options (ratio, energy, backend)
            result = settings_cls.from_dict(raw).apply(model, tokenizer=tokenizer)
        else:
            result = module.apply_lowrank(model, ratio=options.ratio, backend=options.backend)
    except ValueError as exc:
        raise ConfigError(f"lowrank: {exc}") from exc
    return model if result is None else result


def shared_llm(context: PipelineContext, settings: LLMSettings) -> CausalLM:
    """The pipeline-wide model for ``settings`` on the resolved device (loaded on first use)."""
    device = resolve_device(settings, context.device)
    return context.shared(settings.cache_key(device), lambda: load_causal_lm(settings, device))
