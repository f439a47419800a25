"""``streamrank train-reranker``: train a pipeline's one-pass reranker (FIRST, groupwise, E2Rank).

1. Queries: the split's judged queries, or pseudo-queries from the corpus when the split has no
   qrels (:mod:`~streamrank.eval.training.examples`); the command prints which. A split named
   ``test`` is refused.
2. The stages before the reranker (its first stage) run over them; the reranker's top ``depth`` of
   each pool, in the target order (qrels first, then the ``teacher`` pipeline's order, else the
   first stage's), are the examples: cut into the stage's windows (FIRST) or groups (groupwise), whole
   pools for E2Rank. Without a teacher, examples with no relevant passage are dropped.
3. The student (:mod:`~streamrank.eval.training.llm_student`,
   :mod:`~streamrank.eval.training.encoder_student`) trains in :func:`~streamrank.eval.training.loop.run_loop`
   with checkpoints in ``OUTPUT/checkpoint`` (``--resume`` continues there, reusing the examples).
4. ``OUTPUT`` gets the model (a folder the stage's ``model`` / ``llm.model`` option loads) and
   ``training.json``: data, teacher, settings, loss curve, seconds and examples/s.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamrank.errors import ConfigError, StreamRankError
from streamrank.eval.training.examples import (
    Example,
    build_examples,
    load_examples,
    save_examples,
    training_queries,
    windows_of,
)
from streamrank.eval.training.loop import LoopSettings, TrainingLog, run_loop
from streamrank.rankers.e2rank import EmbeddingListwise
from streamrank.rankers.groupwise import GroupwiseReranker, plan_groups
from streamrank.rankers.listwise import SingleTokenListwise
from streamrank.types import Query, Ranking

RECIPES: dict[type, str] = {
    SingleTokenListwise: "FIRST",
    GroupwiseReranker: "groupwise",
    EmbeddingListwise: "E2Rank",
}


@dataclass(frozen=True)
class RerankerTraining:
    """Options of one training run (the CLI's flags); None means the recipe's default."""

    steps: int = 200
    batch_size: int | None = None
    """Default: 1 prompt for the LLM recipes (a window is ~2,000 tokens), 4 queries for E2Rank (8 x 10 texts
    of 256 tokens held 11.5 GB)."""
    lr: float | None = None
    """Default: 2e-4 for LoRA, 1e-5 for a whole LLM, 2e-5 for the E2Rank encoder."""
    seed: int = 0
    full: bool = False
    lora_rank: int = 8
    layers: int = 8
    """LoRA on the top N layers (0: every layer)."""
    list_size: int = 8
    """E2Rank: candidates per query in the listwise loss."""
    checkpoint_every: int = 50
    query_batch: int = 32
    """Queries per first-stage / teacher call."""
    pseudo_queries: Literal["titles", "generated"] = "titles"
    """Where a split has no qrels: titles (first sentences), or questions ``generator`` writes (GPL)."""
    generator: str = "smollm2"
    """The causal LM that writes the generated pseudo-queries."""
    order: Literal["shuffled", "first-stage"] = "shuffled"
    """FIRST / groupwise: passages of each example shuffled (the recipe), or in the first stage's order."""
    heldout: int = 0
    """FIRST / groupwise: keep this many examples (a seeded draw) out of training and report how the trained and
    the untrained model order them (:meth:`LLMStudent.heldout_report`) in ``training.json``."""
    dtype: Literal["float32", "bfloat16", "auto"] = "auto"
    """Forward-pass compute dtype (:class:`LoopSettings`): ``auto`` trains under bfloat16 autocast where it
    runs natively (FIRST window on one AVX-512 BF16 core: 6.4 s a step vs 12-14 s in float32)."""


def default_output(pipeline_name: str, stage: str, dataset: str) -> Path:
    from streamrank.models import cache_home

    return cache_home() / "models" / "trained" / f"{pipeline_name}-{stage}-{dataset.replace('/', '-')}"


def find_stage(stages: Sequence[Any], name: str | None, source: str) -> int:
    """Position of the stage to train: the one named ``name``, else the last trainable one."""
    names = [s.name for s in stages]
    if name is not None:
        if name not in names:
            raise ConfigError(f"{source}: no top-level stage named {name!r} (stages: {', '.join(names)})")
        position = names.index(name)
        if type(stages[position]) not in RECIPES:
            raise ConfigError(
                f"{source}: stage {name!r} is a {type(stages[position]).__name__}; train-reranker trains "
                f"{', '.join(c.__name__ for c in RECIPES)}"
            )
    else:
        found = [i for i, s in enumerate(stages) if type(s) in RECIPES]
        if not found:
            raise ConfigError(f"{source}: no stage train-reranker can train (first, groupwise or e2rank)")
        position = found[-1]
    if position == 0:
        raise ConfigError(f"{source}: stage {names[position]!r} needs a first stage before it to train on")
    return position


def teacher_ranks(
    teacher: str | Path, dataset: str, queries: Sequence[Query], batch: int
) -> dict[str, dict[str, int]]:
    """Query id -> {doc id: rank in the teacher pipeline's ranking (0 best)}."""
    from streamrank.compose import load_pipeline

    pipe = load_pipeline(teacher, corpus=str(dataset))
    try:
        pipe.index()
        rankings = pipe.run_batched([Ranking(query=q) for q in queries], batch, desc="teacher")
    finally:
        pipe.close()
    return {r.query.id: {c.doc_id: rank for rank, c in enumerate(r.candidates)} for r in rankings}


def make_examples(
    pipe: Any,
    position: int,
    dataset: str,
    split: str,
    teacher: str | Path | None,
    limit: int | None,
    options: RerankerTraining,
    workdir: Path,
) -> tuple[list[Example], dict[str, Any]]:
    """Run the first stage (and the teacher) over the training queries; the stage's examples.
    Generated pseudo-queries are kept in ``workdir`` as they are made (a rerun continues)."""
    from functools import partial

    from streamrank.datasets import load_dataset
    from streamrank.eval.training.query_generation import generated_queries
    from streamrank.pipeline import Pipeline

    stage = pipe.stages[position]
    make_pseudo = (
        partial(generated_queries, cache=workdir / "generated-queries.jsonl", model=options.generator)
        if options.pseudo_queries == "generated"
        else None
    )
    source = training_queries(load_dataset(dataset), split, limit, options.seed, make_pseudo)
    print(f"training queries: {source.description}", file=sys.stderr)
    if make_pseudo is not None and source.kind == "qrels":
        print("note: --pseudo-queries generated is not used: the split has qrels", file=sys.stderr)
    print(
        f"teacher: {teacher or 'none (target: relevant first, then the first stage order)'}", file=sys.stderr
    )
    prefix = Pipeline(f"{pipe.name}-first-stage", pipe.stages[:position], pipe.context)
    pools = prefix.run_batched(
        [Ranking(query=q) for q in source.queries], options.query_batch, desc="first stage"
    )
    depth = stage.depth or max(len(r.candidates) for r in pools)
    pool_ids = {r.query.id: [c.doc_id for c in r.candidates[:depth]] for r in pools}
    ranks = teacher_ranks(teacher, dataset, source.queries, options.query_batch) if teacher else None
    examples = build_examples(pool_ids, source.queries, source.qrels, ranks)
    if isinstance(stage, SingleTokenListwise):
        examples = windows_of(
            examples, lambda n: [range(s, e) for s, e in stage.spans(n)], need_signal=teacher is None
        )
    elif isinstance(stage, GroupwiseReranker):
        cfg = stage.config
        examples = windows_of(
            examples,
            lambda n: plan_groups(n, cfg.group_size, cfg.anchors, cfg.calibration).groups,
            need_signal=teacher is None,
        )
    elif teacher is None:
        examples = [e for e in examples if e.relevant]
    meta = {
        "source": source.kind,
        "source_description": source.description,
        "queries": len(source.queries),
        "queries_with_a_relevant_candidate": sum(
            1
            for q in source.queries
            if any(source.qrels.get(q.id, {}).get(d, 0) > 0 for d in pool_ids.get(q.id, ()))
        ),
        "teacher": str(teacher) if teacher else None,
        "depth": depth,
    }
    return examples, meta


def document_texts(pipe: Any, examples: Sequence[Example]) -> dict[str, str]:
    """Doc id -> the text the stage sees (``Document.contents``), from the pipeline's store."""
    ids = sorted({d for e in examples for d in e.doc_ids})
    found = pipe.context.store.get_many(ids)
    missing = [d for d in ids if d not in found]
    if missing:
        raise StreamRankError(f"{len(missing)} candidates have no text in the store (e.g. {missing[:3]})")
    return {d: found[d].contents for d in ids}


def train_reranker(
    dataset: str,
    pipeline: str | Path,
    *,
    split: str = "train",
    stage: str | None = None,
    teacher: str | Path | None = None,
    output: Path | None = None,
    limit: int | None = None,
    resume: bool = False,
    options: RerankerTraining | None = None,
) -> Path:
    """Train the pipeline's one-pass reranker on ``dataset``/``split`` (module docstring); returns the folder."""
    from streamrank.compose import load_pipeline
    from streamrank.datasets import load_dataset, refuse_test_split

    refuse_test_split(
        split, "train a reranker", "pseudo-queries from the corpus stand in where a set has no train qrels"
    )
    options = options or RerankerTraining()
    data = load_dataset(dataset)
    pipe = load_pipeline(pipeline, corpus=str(dataset))
    try:
        position = find_stage(pipe.stages, stage, str(pipeline))
        target = pipe.stages[position]
        recipe = RECIPES[type(target)]
        out = Path(output) if output is not None else default_output(pipe.name, target.name, data.name)
        checkpoint = out / "checkpoint"
        examples_file = checkpoint / "examples.json"
        pipe.index()
        if resume and examples_file.exists():
            examples, meta = load_examples(examples_file)
            print(
                f"examples: {len(examples)} from {examples_file} ({meta['source_description']})",
                file=sys.stderr,
            )
        else:
            examples, meta = make_examples(
                pipe, position, str(dataset), split, teacher, limit, options, checkpoint
            )
            save_examples(examples_file, examples, meta)
        if not examples:
            raise StreamRankError(
                "no training examples: no pool holds a relevant passage (give a --teacher?)"
            )
        print(f"{recipe}: {len(examples)} examples from {meta['queries']} queries", file=sys.stderr)
        texts = document_texts(pipe, examples)
        heldout = options.heldout if recipe != "E2Rank" else 0
        if options.heldout and not heldout:
            print("note: --heldout applies to FIRST/groupwise; E2Rank trains on every example", file=sys.stderr)
        examples, held = hold_out(examples, heldout, options.seed)
        student, settings = _student(target, texts, options)
        print(
            f"training {student.description} for {settings.steps} steps of {settings.batch_size}",
            file=sys.stderr,
        )
        log = run_loop(student, examples, settings, checkpoint, resume=resume, desc=f"train {recipe}")
        report = heldout_reports(student, held, settings) if held else None
        student.save(out)
        record = training_record(
            recipe, dataset, split, pipeline, target.name, meta, student, settings, log, len(examples)
        )
        if report is not None:
            record["heldout"] = report
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        print(
            f"trained {recipe} in {log.seconds:.0f} s ({log.examples_per_second:.3f} examples/s); "
            f"loss {record['loss_first_10']:.4f} (first 10 steps) -> {record['loss_last_10']:.4f} (last 10)",
            file=sys.stderr,
        )
    finally:
        pipe.close()
    return out


def hold_out(examples: list[Example], count: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(examples to train on, ``count`` examples drawn with ``seed`` and kept out); at least one stays in."""
    if count <= 0:
        return examples, []
    if count >= len(examples):
        raise ConfigError(f"--heldout {count} leaves nothing to train on ({len(examples)} examples)")
    chosen = set(np.random.default_rng([seed, 3]).permutation(len(examples))[:count].tolist())
    return [e for i, e in enumerate(examples) if i not in chosen], [examples[i] for i in sorted(chosen)]


def heldout_reports(student: Any, held: Sequence[Example], settings: LoopSettings) -> dict[str, Any]:
    """The held-out report of the trained model and, for a LoRA student, of the untrained one; printed too."""
    from streamrank.eval.training.loop import compute_context

    with compute_context(settings.dtype, str(student.device)):
        reports = {"trained": student.heldout_report(held, settings.seed)}
        if not student.full:
            reports["untrained"] = student.heldout_report(held, settings.seed, trained=False)
    for name, r in reports.items():
        top = max(range(len(r["top_position_counts"])), key=r["top_position_counts"].__getitem__)
        print(
            f"held out ({r['examples']} examples), {name}: top identifier relevant {r['top1_relevant']:.3f}, "
            f"MRR {r['mrr']:.3f}; most often on position {top} "
            f"({r['top_position_counts'][top]} of {r['examples']})",
            file=sys.stderr,
        )
    return reports


def _student(target: Any, texts: dict[str, str], options: RerankerTraining) -> tuple[Any, LoopSettings]:
    if isinstance(target, EmbeddingListwise):
        from streamrank.eval.training.encoder_student import EncoderStudent

        student: Any = EncoderStudent(target, texts, list_size=options.list_size, seed=options.seed)
        batch, lr = options.batch_size or 4, options.lr or 2e-5
    else:
        from streamrank.eval.training.llm_student import LLMStudent

        student = LLMStudent(
            target,
            texts,
            full=options.full,
            lora_rank=options.lora_rank,
            layers=options.layers,
            seed=options.seed,
            order=options.order,
        )
        batch, lr = options.batch_size or 1, options.lr or (1e-5 if options.full else 2e-4)
    settings = LoopSettings(
        steps=options.steps,
        batch_size=batch,
        lr=lr,
        seed=options.seed,
        checkpoint_every=options.checkpoint_every,
        dtype=options.dtype,
    )
    return student, settings


def training_record(
    recipe: str,
    dataset: str,
    split: str,
    pipeline: str | Path,
    stage: str,
    meta: dict[str, Any],
    student: Any,
    settings: LoopSettings,
    log: TrainingLog,
    examples: int,
) -> dict[str, Any]:
    """What ``training.json`` says: how the model was trained and what it cost."""
    import torch

    from streamrank.models import resolve_dtype

    def mean(values: Sequence[float]) -> float:
        return float(sum(values) / len(values)) if values else float("nan")

    return {
        "recipe": recipe,
        "dataset": str(dataset),
        "split": split,
        "pipeline": str(pipeline),
        "stage": stage,
        **meta,
        "examples": examples,
        "base_model": getattr(student, "base_model", None),
        "trainable": student.description,
        "passage_order": getattr(student, "order", None),
        "settings": asdict(settings),
        "steps": log.step,
        "resumed_from": log.resumed_from,
        "seconds": round(log.seconds, 2),
        "examples_seen": log.examples_seen,
        "examples_per_second": round(log.examples_per_second, 4),
        "loss_first_10": mean(log.losses[:10]),
        "loss_last_10": mean(log.losses[-10:]),
        "loss_curve": [round(v, 5) for v in log.losses],
        "loss_parts": {k: [round(v, 5) for v in vs] for k, vs in log.parts.items()},
        "compute_dtype": resolve_dtype(settings.dtype, str(student.device)),
        "torch_threads": torch.get_num_threads(),
        "device": str(student.device),
        "machine": platform.machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
