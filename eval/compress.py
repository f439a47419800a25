"""`streamrank compress`: SVD-compress a model, optionally heal it by distillation, save its factors.

``compress_model_folder(model, output, CompressOptions(ratio=0.6, heal=True))``:

1. loads the dense model (a sentence encoder, or a causal LM: SmolLM2, a GGUF file or any
   ``*ForCausalLM`` folder) and a private copy of it;
2. compresses the copy (:class:`streamrank.kernels.lowrank.LowRankSettings`: whitened SVD calibrated on
   ``calibration`` texts, or plain SVD with ``calibration=None``);
3. with ``heal``, distils the copy toward the dense model on corpus texts, factors only
   (:mod:`streamrank.eval.compress_heal`);
4. writes ``output/lowrank.safetensors`` + ``lowrank.json`` (the factors, as
   :func:`streamrank.kernels.svd.save_compressed` does) and ``compress.json`` (what was done, how long it
   took, and the ``lowrank`` setting that loads it).

Healing shows a progress bar and saves a checkpoint into ``output/heal-checkpoint`` every 50 steps; a
rerun of the same command after a crash compresses again (deterministic) and resumes healing there.

A pipeline then loads the factors as they are, with no decomposition at load time: in a dense stage
``model = "<the same model>"`` and ``lowrank = {factors = "OUTPUT"}``; in an LLM reranker
``llm = {model = "<the same model>", lowrank = {factors = "OUTPUT"}}``.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streamrank.errors import ConfigError

log = logging.getLogger(__name__)

INFO_FILE = "compress.json"
HEAL_CHECKPOINT = "heal-checkpoint"
"""Folder in the output where healing saves its progress (removed once the factors are written)."""
DEFAULT_HEAL_TEXTS = 2000
FIDELITY_TEXTS = 64
"""Texts after the healing ones on which ``compress.json`` reports how close the result is to the dense model."""


@dataclass(frozen=True)
class CompressOptions:
    """What ``streamrank compress`` does; see the module notes."""

    ratio: float
    calibration: str | None = "auto"
    calibration_size: int = 256
    heal: bool = False
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    max_length: int = 128
    texts: str | None = None
    """Healing texts (a dataset name, folder or file, as for calibration); default: the calibration source."""
    text_count: int = DEFAULT_HEAL_TEXTS
    seed: int = 0
    device: str | None = None


def is_causal_lm(name: str) -> bool:
    """True for SmolLM2, a ``.gguf`` file, or a model folder whose config names a ``*ForCausalLM``."""
    from streamrank.models import is_smollm2, resolve_model

    if is_smollm2(name) or name.lower().endswith(".gguf"):
        return True
    config = Path(resolve_model(name)) / "config.json"
    if not config.exists() or (config.parent / "modules.json").exists():
        return False  # a sentence-transformers folder (or a hub name): an encoder
    architectures = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in architectures)


def _load(name: str, device: str) -> tuple[str, Any, Any]:
    """``(kind, model, tokenizer)``: the module the pipeline compresses (encoder root or HF causal LM)."""
    if is_causal_lm(name):
        from streamrank.rankers.causal_lm_loading import LLMSettings, load_causal_lm

        llm = load_causal_lm(LLMSettings(model=name), device)
        return "causal-lm", llm.model, llm.tokenizer
    from streamrank.models import load_sentence_encoder

    return "encoder", load_sentence_encoder(name, device), None


def compress_model_folder(model: str, output: str | Path, options: CompressOptions) -> dict[str, Any]:
    """Compress (and heal) ``model``; write its factors and ``compress.json`` into ``output``; return the info."""
    import torch

    from streamrank.eval.compress_heal import HealSettings, heal_causal_lm, heal_encoder
    from streamrank.kernels.calibrate import load_texts
    from streamrank.kernels.lowrank import LowRankSettings
    from streamrank.kernels.svd import lowrank_layers, save_compressed
    from streamrank.models import default_device

    out = Path(output)
    if (out / "lowrank.json").exists():
        raise ConfigError(f"{out} already holds compressed factors; choose another --output")
    device = options.device or default_device()
    try:
        settings = LowRankSettings(
            ratio=options.ratio, calibration=options.calibration, calibration_size=options.calibration_size
        )
    except ValueError as exc:
        raise ConfigError(f"compress: {exc}") from exc
    started = time.perf_counter()
    kind, teacher, tokenizer = _load(model, device)
    student = copy.deepcopy(teacher)
    settings.apply(student, tokenizer=tokenizer)
    compressed_at = time.perf_counter()
    layers = lowrank_layers(student)
    dense_params = sum(m.in_features * m.out_features for m in layers.values())
    kept_params = sum(m.rank * (m.in_features + m.out_features) for m in layers.values())
    info: dict[str, Any] = {
        "model": model,
        "kind": kind,
        "ratio": options.ratio,
        "method": settings.method,
        "calibration": options.calibration,
        "layers": len(layers),
        "linear_parameters_kept": round(kept_params / dense_params, 4),
        "compress_seconds": round(compressed_at - started, 1),
        "heal": None,
        "options": asdict(options),
    }
    source = options.texts or options.calibration or "auto"
    read = load_texts(source, options.text_count + FIDELITY_TEXTS)  # healing texts, then the held-out ones
    texts, held_out = read[: options.text_count], read[options.text_count :]
    if options.heal:
        heal = HealSettings(
            steps=options.steps,
            batch_size=options.batch_size,
            lr=options.lr,
            max_length=options.max_length,
            seed=options.seed,
        )
        torch.manual_seed(options.seed)
        checkpoint = out / HEAL_CHECKPOINT  # a rerun with the same --output resumes healing from it
        if kind == "encoder":
            report = heal_encoder(student, teacher, texts, heal, checkpoint)
        else:
            report = heal_causal_lm(student, teacher, tokenizer, texts, heal, checkpoint)
        info["heal"] = {**report.to_dict(), "texts": source, "text_count": len(texts), "device": device}
    info["fidelity"] = fidelity(kind, teacher, student, tokenizer, held_out, options.max_length)
    save_compressed(student, out)
    info["seconds"] = round(time.perf_counter() - started, 1)
    info["lowrank"] = {"factors": str(out)}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out / HEAL_CHECKPOINT, ignore_errors=True)  # the factors are saved: nothing to resume
    return info


def fidelity(
    kind: str, teacher: Any, student: Any, tokenizer: Any, texts: list[str], max_length: int = 128
) -> dict[str, Any]:
    """How close the compressed ``student`` is to the dense ``teacher`` on ``texts`` (held out from healing):
    causal LMs: top-1 next-token agreement over every non-padding position; encoders: the mean and lowest
    cosine between the two sentence embeddings of a text."""
    import torch

    if not texts:
        return {"texts": 0}
    with torch.inference_mode():
        if kind == "encoder":
            want = teacher.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
            got = student.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
            cos = (want * got).sum(-1)
            return {"texts": len(texts), "mean_cosine": round(float(cos.mean()), 6), "min_cosine": round(float(cos.min()), 6)}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        agree = positions = 0
        for start in range(0, len(texts), 8):
            enc = tokenizer(texts[start : start + 8], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            ids, mask = enc["input_ids"].to(teacher.device), enc["attention_mask"].to(teacher.device)
            want = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits.argmax(-1)
            got = student(input_ids=ids, attention_mask=mask, use_cache=False).logits.argmax(-1)
            real = mask.bool()
            agree += int((want == got)[real].sum())
            positions += int(real.sum())
    return {"texts": len(texts), "positions": positions, "top1_agreement": round(agree / max(1, positions), 4)}


def summary(info: dict[str, Any]) -> str:
    """A few lines for the terminal: what was written and the setting that loads it."""
    lines = [
        f"{info['model']} ({info['kind']}): {info['layers']} layers, {info['linear_parameters_kept']:.0%} of the "
        f"linear-layer parameters kept ({info['method']}), compressed in {info['compress_seconds']} s",
    ]
    heal = info.get("heal")
    if heal:
        lines.append(
            f"healed {heal['steps']} steps on {heal['text_count']} texts of {heal['texts']} in {heal['seconds']} s "
            f"({heal['device']}): loss {heal['loss_first']:.4f} -> {heal['loss_last']:.4f}"
        )
    close = info.get("fidelity") or {}
    if "top1_agreement" in close:
        lines.append(f"top-1 next-token agreement with the dense model: {close['top1_agreement']:.3f} ({close['positions']} held-out positions)")
    elif "mean_cosine" in close:
        lines.append(f"embedding cosine to the dense model: mean {close['mean_cosine']:.4f}, lowest {close['min_cosine']:.4f} ({close['texts']} held-out texts)")
    where = info["lowrank"]["factors"]
    lines.append(f'written to {where}; load it with lowrank = {{factors = "{where}"}} (same model)')
    return "\n".join(lines)
