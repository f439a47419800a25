"""The FIRST recipe for the single-token rerankers (FIRST listwise, groupwise): a causal LM trained on
its own prompts.

Every example is a window (FIRST) or a group (groupwise) of the first stage's candidates in a fresh
random order (``order = "shuffled"``, the recipe's default: position stops deciding), or in the first
stage's order as the stage sees them at inference (``"first-stage"``), put into the very prompt the
stage scores (``window_prompt`` / ``group_prompt``, one prompt builder for training and inference). One forward pass gives the logits at the answer position;
the loss is :func:`~streamrank.eval.training.losses.first_token_loss`. The stage's model is copied
first (the pipeline's shared model is never changed); on a CPU LoRA adapters (peft) on the top
``layers`` layers are trained, so the layers below run without a graph; ``full`` trains every weight.
:meth:`LLMStudent.save` writes merged weights and the tokenizer: a folder ``llm = {model = "DIR"}`` loads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from streamrank.errors import ConfigError
from streamrank.eval.training.examples import Example
from streamrank.eval.training.losses import RANKNET_WEIGHT, first_token_loss
from streamrank.rankers.groupwise import GroupwiseReranker
from streamrank.rankers.listwise import SingleTokenListwise
from streamrank.rankers.prompts import ListwisePrompt

if TYPE_CHECKING:
    import torch

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers LoRA adapts when the model has them (Llama-family names); else peft's defaults."""


def prompt_function(
    stage: SingleTokenListwise | GroupwiseReranker,
) -> Callable[[str, Sequence[str]], ListwisePrompt]:
    """The stage's own prompt for a window / group of passages."""
    return stage.window_prompt if isinstance(stage, SingleTokenListwise) else stage.group_prompt


class LLMStudent:
    """A copy of the stage's causal LM with LoRA adapters (or all weights) trainable."""

    def __init__(
        self,
        stage: SingleTokenListwise | GroupwiseReranker,
        texts: Mapping[str, str],
        *,
        full: bool = False,
        lora_rank: int = 8,
        layers: int = 8,
        seed: int = 0,
        order: Literal["shuffled", "first-stage"] = "shuffled",
    ) -> None:
        import torch

        torch.manual_seed(seed)
        llm = stage.llm
        self.base_model = llm.name
        self.prompt = prompt_function(stage)
        self.texts = texts
        self.tokenizer = llm.tokenizer
        self.pad_id = llm.pad_id
        self.device = llm.device
        model = copy.deepcopy(llm.model)
        model.requires_grad_(full)
        self.full = full
        self.order = order
        if full:
            self.description = f"the whole model ({sum(p.numel() for p in model.parameters()):,} parameters)"
        else:
            model, self.description = add_lora(model, lora_rank, layers)
        model.train()
        self.model = model

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def prompts(self, example: Example, rng: np.random.Generator) -> tuple[ListwisePrompt, list[int]]:
        """The example's passages in the stage's prompt (shuffled, or in first-stage order), and each one's
        target rank."""
        n = len(example.doc_ids)
        order = rng.permutation(n) if self.order == "shuffled" else np.arange(n)
        rank_of = {index: rank for rank, index in enumerate(example.target)}
        prompt = self.prompt(example.query, [self.texts[example.doc_ids[i]] for i in order])
        return prompt, [rank_of[int(i)] for i in order]

    def loss(
        self, batch: Sequence[Example], rng: np.random.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        prompts, ranks = zip(*(self.prompts(e, rng) for e in batch), strict=True)
        logits = self.answer_logits([p.ids for p in prompts])
        parts = [
            first_token_loss(logits[b], torch.tensor(p.label_ids), torch.tensor(r))
            for b, (p, r) in enumerate(zip(prompts, ranks, strict=True))
        ]
        ce = torch.stack([c for c, _ in parts]).mean()
        ranknet = torch.stack([r for _, r in parts]).mean()
        return ce + RANKNET_WEIGHT * ranknet, {"ce": float(ce.detach()), "ranknet": float(ranknet.detach())}

    def heldout_report(self, examples: Sequence[Example], seed: int, *, trained: bool = True) -> dict[str, Any]:
        """How the trained (or, ``trained=False``, the untrained) model orders held-out examples, put in the
        student's order (shuffled once with ``seed``, or the first stage's): the share whose highest
        identifier logit is a relevant passage (``top1_relevant``), the mean reciprocal rank of the first
        relevant one, and how often each prompt position got the highest logit (a model that learned a
        position, not relevance, shows one dominant position)."""
        import contextlib

        import torch

        if not trained and self.full:
            raise ValueError("the untrained model is only at hand for a LoRA student")
        # peft's disable_adapter runs the frozen base weights: the untrained model, without a second copy
        weights = contextlib.nullcontext() if trained else self.model.disable_adapter()
        rng = np.random.default_rng([seed, 2])
        top1, reciprocal, positions = 0, 0.0, [0] * max(len(e.doc_ids) for e in examples)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), weights:
                for example in examples:
                    prompt, ranks = self.prompts(example, rng)
                    logits = self.answer_logits([prompt.ids])[0][list(prompt.label_ids)]
                    order = torch.argsort(logits.float(), descending=True).tolist()
                    relevant = [r < example.relevant for r in ranks]
                    positions[order[0]] += 1
                    top1 += relevant[order[0]]
                    reciprocal += next((1 / (k + 1) for k, p in enumerate(order) if relevant[p]), 0.0)
        finally:
            self.model.train(was_training)
        n = len(examples)
        return {"examples": n, "top1_relevant": top1 / n, "mrr": reciprocal / n, "top_position_counts": positions}

    def answer_logits(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Vocabulary logits after each sequence (left-padded batch): [len(sequences), vocabulary]."""
        import torch

        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = any(len(s) != width for s in sequences)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device) if padded else None,
            position_ids=positions.to(self.device),
            use_cache=False,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def save(self, folder: Path) -> None:
        """Merged weights (``save_pretrained``) and the tokenizer in ``folder``."""
        model = self.model if self.full else self.model.merge_and_unload()
        model.eval()
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def add_lora(model: Any, rank: int, layers: int) -> tuple[Any, str]:
    """``model`` with LoRA adapters of ``rank`` on its top ``layers`` layers (0: all), and a description."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # a dependency, but say what to do if it is missing
        raise ConfigError("LoRA training needs peft: pip install peft (or train --full)") from exc
    total = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    modules = [m for m in LORA_MODULES if m in names] or None
    chosen = list(range(max(total - layers, 0), total)) if layers and total else None
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=modules, layers_to_transform=chosen
    )
    model = get_peft_model(model, config)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    where = f"the top {len(chosen)} of {total} layers" if chosen else "every layer"
    return (
        model,
        f"LoRA r={rank} alpha={2 * rank} on {', '.join(modules or ['peft defaults'])} of {where} ({count:,} parameters)",
    )
