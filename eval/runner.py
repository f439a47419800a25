"""`streamrank eval`: run a pipeline over a dataset, score it, write metrics, a TREC run and a report.

Retrieval form: each judged query of the split goes in as an empty ranking and the pipeline
searches its index (built on first use; an existing index is reused as its manifests allow).
Reranking form: the dataset's own candidates (TREC-DL ``bm25_top100.json``) or a ``--candidates``
file arrive as the rankings' candidates, and every stage scores exactly those.

Outputs in the output folder: ``metrics.json``, ``run.trec`` (the whole final list, excluded ids
removed), ``per_query.json``, ``report.md`` and, with ``compare``, ``comparison.png``.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from streamrank.datasets import Dataset, load_candidates, load_dataset, slug
from streamrank.datasets.trec import RunList, ranked_scores, write_trec_run
from streamrank.errors import ConfigError, DatasetNotFoundError, ModelNotFoundError, StreamRankError
from streamrank.eval.metrics import default_measures, mean_metrics, measure_name, per_query_metrics
from streamrank.types import Candidate, Query, Ranking

if TYPE_CHECKING:
    from streamrank.pipeline import Pipeline

DEFAULT_TABLE = Path(__file__).with_name("reproducibility.toml")
CHART_MEASURES = re.compile(r"^(nDCG@10|R(\(rel=\d+\))?@100)$")
"""Measures drawn in comparison.png."""


# ---- one evaluation -----------------------------------------------------------------------------
def run_eval(
    dataset: str | Path,
    pipeline: str | Path,
    output: Path,
    split: str = "test",
    limit: int | None = None,
    candidates: str | Path | None = None,
    batch_size: int = 1,
    index_dir: str | Path | None = None,
    compare: Sequence[Path] = (),
    *,
    measures: Sequence[str] | None = None,
    top: int | None = None,
    from_stage: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``pipeline`` on ``dataset``/``split``; write the outputs to ``output``; return metrics.json.

    ``top``: rank each query as a request for its best ``top`` would (the serving path: the last stage
    searches only as deep as that needs, fusion's retrievers ``serve_depth`` deep); default: full depth.
    ``from_stage``: run only the stages from the one of that name on, over the supplied candidates (a
    reranking-form dataset's pool or ``candidates``).
    """
    if batch_size < 1:
        raise StreamRankError(f"batch size must be at least 1, got {batch_size}")
    if top is not None and top < 1:
        raise StreamRankError(f"--top must be at least 1, got {top}")
    data = load_dataset(dataset)
    queries = data.queries(split)[: limit if limit else None]
    if not queries:
        raise StreamRankError(f"dataset {data.name!r} has no judged queries in split {split!r}")
    measures = list(measures or default_measures(data.rel_level))
    compared = [_load_result(Path(d)) for d in compare]  # fail early on a bad folder

    from streamrank.compose import load_pipeline

    pipe = load_pipeline(pipeline, corpus=str(dataset) if data.has_corpus else "", index_dir=index_dir)
    if from_stage is not None:
        if candidates is None and data.kind != "rerank":
            pipe.close()
            raise StreamRankError(
                f"--from-stage {from_stage!r} reranks supplied candidates: {data.name!r} supplies none, pass --candidates"
            )
        try:
            pipe = pipe.from_stage(from_stage)
        except StreamRankError:
            pipe.close()
            raise
    try:
        index_seconds = _ensure_index(pipe)
        started = time.perf_counter()
        pools = _candidate_pools(data, split, candidates, pipe)
        rankings = _initial_rankings(queries, pools)
        run, latencies, stage_ms, calls = rank_run(pipe, rankings, batch_size, data.excluded_ids(split), top=top)
        judged = data.qrels(split)
        per_query = per_query_metrics(
            {qid: dict(hits) for qid, hits in run.items()}, {q.id: judged[q.id] for q in queries}, measures
        )
        metrics = mean_metrics(per_query, measures)
        eval_seconds = time.perf_counter() - started
    finally:
        pipe.close()

    result: dict[str, Any] = {
        "dataset": data.name,
        "pipeline": pipe.name,
        "split": split,
        "queries": len(queries),
        "top": top,
        "metrics": metrics,
        "latency_ms": {"p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95)},
        "stages": {name: {"mean_ms": sum(v) / len(v)} for name, v in stage_ms.items()},
        "index_seconds": index_seconds,
        "eval_seconds": eval_seconds,
        "model_calls": calls,
    }
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (output / "per_query.json").write_text(json.dumps(per_query, indent=1) + "\n")
    write_trec_run(output / "run.trec", {q.id: run.get(q.id, []) for q in queries}, tag=pipe.name)
    runs = [(_label(result, output), result)] + [
        (_label(r, d), r) for d, r in zip(compare, compared, strict=True)
    ]
    if compared:
        plot_comparison(output / "comparison.png", runs)
    else:
        (output / "comparison.png").unlink(missing_ok=True)  # never leave a stale chart beside a new report
    (output / "report.md").write_text(render_report(result, runs if compared else [], batch_size))
    return result


def _ensure_index(pipe: Pipeline) -> float:
    """Build whatever index the pipeline lacks (a no-op when they exist); seconds spent."""
    if pipe.context.corpus is None:
        return 0.0
    started = time.perf_counter()
    pipe.index()
    return time.perf_counter() - started


def _candidate_pools(
    data: Dataset, split: str, candidates: str | Path | None, pipe: Pipeline
) -> dict[str, list[Candidate]] | None:
    """Candidates to rerank per query id, or None for retrieval."""
    if candidates is not None:
        lookup = pipe.context.store.get_many if pipe.context.corpus is not None else data.documents
        pools = load_candidates(candidates, corpus_lookup=lookup)
    elif data.kind == "rerank":
        pools = data.candidates(split)
        if pools is None:
            raise StreamRankError(
                f"{data.name!r} is a reranking set without a candidate file in {data.path}; pass --candidates FILE"
            )
    else:
        return None
    textless = sum(1 for pool in pools.values() for c in pool if c.document is None)
    if textless:
        print(f"warning: {textless} candidates have no document text (not in the corpus)", file=sys.stderr)
    return pools


def _initial_rankings(queries: Sequence[Query], pools: Mapping[str, list[Candidate]] | None) -> list[Ranking]:
    """One ranking per query; in reranking form, queries without candidates are left out (they score 0)."""
    if pools is None:
        return [Ranking(query=q) for q in queries]
    missing = [q.id for q in queries if not pools.get(q.id)]
    if missing:
        print(
            f"warning: {len(missing)} queries have no candidates and score 0: {missing[:5]}", file=sys.stderr
        )
    return [Ranking(query=q, candidates=pools[q.id]) for q in queries if pools.get(q.id)]


def rank_run(
    pipe: Pipeline,
    rankings: Sequence[Ranking],
    batch_size: int,
    excluded: Mapping[str, set[str]],
    top: int | None = None,
) -> tuple[RunList, list[float], dict[str, list[float]], dict[str, int]]:
    """Run the pipeline batch by batch (``top``: as requests for that many); keep only the run, per-query
    latency, stage times, call totals."""
    from tqdm import tqdm

    run: RunList = {}
    latencies: list[float] = []
    stage_ms: dict[str, list[float]] = {}
    calls = {"count": 0, "prompt_tokens": 0, "output_tokens": 0}
    from streamrank.pipeline import progress_options

    with tqdm(total=len(rankings), unit="q", desc=f"eval {pipe.name}", **progress_options(len(rankings))) as bar:
        for start in range(0, len(rankings), batch_size):
            batch = list(rankings[start : start + batch_size])
            began = time.perf_counter()
            ranked = pipe.run(batch, k=top)
            per_query_ms = (time.perf_counter() - began) * 1000.0 / len(batch)
            for ranking in ranked:
                latencies.append(per_query_ms)
                for name, ms in ranking.timings_ms.items():
                    stage_ms.setdefault(name, []).append(ms / len(batch))
                calls["count"] += len(ranking.calls)
                calls["prompt_tokens"] += sum(c.prompt_tokens for c in ranking.calls)
                calls["output_tokens"] += sum(c.output_tokens for c in ranking.calls)
                drop = excluded.get(ranking.query.id, set())
                run[ranking.query.id] = ranked_scores(c for c in ranking.candidates if c.doc_id not in drop)
            bar.update(len(batch))
    return run, latencies, stage_ms, calls


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    import numpy as np

    return float(np.percentile(values, q))


# ---- report -------------------------------------------------------------------------------------
def _load_result(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    if not path.is_file():
        raise StreamRankError(f"--compare {folder}: no metrics.json there (is it an eval output folder?)")
    return json.loads(path.read_text())


def _label(result: Mapping[str, Any], folder: Path) -> str:
    return f"{result['pipeline']} ({Path(folder).name})"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("–" if value is None else str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_report(
    result: Mapping[str, Any], runs: Sequence[tuple[str, Mapping[str, Any]]], batch_size: int
) -> str:
    """report.md: the metrics, cost figures and, when ``runs`` are given, a comparison table and chart."""
    metrics = result["metrics"]
    latency, calls = result["latency_ms"], result["model_calls"]
    parts = [
        f"# {result['pipeline']} on {result['dataset']} ({result['split']}, {result['queries']} queries)\n",
        _table(["measure", "value"], list(metrics.items())),
        f"Latency per query: p50 {latency['p50']:.1f} ms, p95 {latency['p95']:.1f} ms (batch size {batch_size}). "
        f"Index build/check: {result['index_seconds']:.1f} s. Evaluation: {result['eval_seconds']:.1f} s. "
        f"Model calls: {calls['count']} ({calls['prompt_tokens']} prompt + {calls['output_tokens']} output tokens).\n",
    ]
    if result["stages"]:
        parts.append(
            _table(
                ["stage", "mean ms per query"],
                [(n, f"{s['mean_ms']:.2f}") for n, s in result["stages"].items()],
            )
        )
    if runs:
        names = list(metrics)
        rows = [
            (label, r["dataset"], r["queries"], *(r["metrics"].get(m) for m in names)) for label, r in runs
        ]
        parts += [
            "## Comparison\n",
            _table(["run", "dataset", "queries", *names], rows),
            "![comparison](comparison.png)\n",
        ]
    return "\n".join(parts)


def plot_comparison(path: Path, runs: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """A grouped bar chart of nDCG@10 and R@100 (or R(rel=2)@100) per run, saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measures = [m for m in runs[0][1]["metrics"] if CHART_MEASURES.match(m)] or list(runs[0][1]["metrics"])[
        :2
    ]
    fig = Figure(figsize=(max(5.0, 1.6 * len(runs) * len(measures)), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for i, (label, result) in enumerate(runs):
        values = [result["metrics"].get(m, 0.0) for m in measures]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(measures))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(measures)), measures)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{runs[0][1]['dataset']} ({runs[0][1]['split']})")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


# ---- reproducibility table ----------------------------------------------------------------------
class ReproRow(BaseModel):
    """One expected score. ``expected`` left out means "not measured yet": the row fails until filled."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    pipeline: str
    split: str = "test"
    measure: str = "nDCG@10"
    expected: float | None = None
    tolerance: float = 0.005
    limit: int | None = None
    candidates: str | None = None
    top: int | None = None
    from_stage: str | None = None
    note: str = ""
    skip_unavailable: bool = False
    """Report SKIP (with the reason) instead of ERROR when the row's model or dataset cannot be had here
    (a hub checkpoint offline, a dataset not on disk); the published-checkpoint table sets it."""

    @property
    def label(self) -> str:
        """The pipeline as the check's table names it (``hybrid``, ``hybrid top 10``, ``first from first``)."""
        label = Path(self.pipeline).stem
        label += f" from {self.from_stage}" if self.from_stage else ""
        return f"{label} top {self.top}" if self.top is not None else label


def load_table(path: str | Path | None = None) -> list[ReproRow]:
    """Rows of a reproducibility table (``[[row]]`` entries); default: the packaged one."""
    source = Path(path) if path is not None else DEFAULT_TABLE
    try:
        raw = tomllib.loads(source.read_text())
    except FileNotFoundError:
        raise ConfigError(f"reproducibility table {source} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    rows = []
    for i, entry in enumerate(raw.get("row", [])):
        try:
            row = ReproRow.model_validate(entry)
        except ValidationError as exc:
            from streamrank.config import describe_validation_error

            raise ConfigError(describe_validation_error(exc, f"{source}: row[{i}]")) from None
        # Paths in a table are relative to the table; bare names (configs/ pipelines, datasets) stay.
        for key in ("pipeline", "candidates"):
            value = getattr(row, key)
            if value is not None and (source.parent / value).exists():
                setattr(row, key, str(source.parent / value))
        rows.append(row)
    return rows


def check_reproducibility(
    table: str | Path | None = None,
    only: str | None = None,
    limit: int | None = None,
    output: Path | None = None,
) -> int:
    """Run every row (``only``: rows whose dataset or pipeline name contains it); 0 if all are within tolerance.

    ``limit`` overrides each row's query limit (a smoke run; expected values hold for the rows' own limits).
    Each row's outputs go to ``output/<n>-<dataset>-<pipeline>/`` (a temporary folder without ``output``).
    """
    rows = [
        r for r in load_table(table) if only is None or only in r.dataset or only in Path(r.pipeline).stem
    ]
    if not rows:
        raise StreamRankError(
            f"no reproducibility rows match {only!r}" if only else "the reproducibility table is empty"
        )
    with tempfile.TemporaryDirectory(prefix="streamrank-repro-") as tmp:
        base = Path(output) if output is not None else Path(tmp)
        results = [_check_row(i, row, limit, base) for i, row in enumerate(rows)]
    header = ["dataset", "pipeline", "measure", "expected", "got", "diff", "status"]
    print(_plain_table(header, results))
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "reproducibility.json").write_text(
            json.dumps([dict(zip(header, r, strict=True)) for r in results], indent=2) + "\n"
        )
        (Path(output) / "reproducibility.md").write_text(_table(header, results))
    failed = [r for r in results if r[-1] not in ("OK", "SKIP")]
    skipped = sum(r[-1] == "SKIP" for r in results)
    if limit is not None:
        print(f"(--limit {limit}: expected values are for the rows' own query counts)")
    print(
        f"{len(results) - len(failed) - skipped}/{len(results)} rows reproduced"
        + (f", {skipped} skipped (model or dataset not available here; reasons above)" if skipped else "")
    )
    return 1 if failed else 0


def _check_row(i: int, row: ReproRow, limit: int | None, base: Path) -> list[Any]:
    name = f"{i:02d}-{slug(row.dataset)}-{slug(row.label)}"
    cells: list[Any] = [row.dataset, row.label, row.measure, row.expected]
    try:
        measure = measure_name(row.measure)
        measures = list(dict.fromkeys([*default_measures(load_dataset(row.dataset).rel_level), measure]))
        result = run_eval(
            row.dataset,
            row.pipeline,
            base / name,
            split=row.split,
            limit=limit if limit is not None else row.limit,
            candidates=row.candidates,
            batch_size=16,
            measures=measures,
            top=row.top,
            from_stage=row.from_stage,
        )
    except (ModelNotFoundError, DatasetNotFoundError) as exc:
        if not row.skip_unavailable:
            print(f"row {i} ({row.dataset}, {row.pipeline}) failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return [*cells, None, None, "ERROR"]
        print(f"row {i} ({row.dataset}, {row.pipeline}) skipped: {exc}", file=sys.stderr)
        return [*cells, None, None, "SKIP"]
    except Exception as exc:  # noqa: BLE001 - one broken row is reported as ERROR; the table goes on
        print(f"row {i} ({row.dataset}, {row.pipeline}) failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return [*cells, None, None, "ERROR"]
    got = result["metrics"][measure]
    if row.expected is None:
        return [*cells, got, None, "UNSET"]
    diff = got - row.expected
    return [*cells, got, diff, "OK" if abs(diff) <= row.tolerance + 1e-12 else "FAIL"]


def _plain_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(header)] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells)
