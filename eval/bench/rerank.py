"""`streamrank bench rerank`: the LLM rerankers side by side on one model, one input, one machine.

Inputs: a DL19 query and its BM25 top-100 passages (``dl19-passage/bm25_top100.json``); longer
lists are made by repeating those passages. All parts use the same loaded model, torch threads
and passage cap, so their figures compare directly:

(a) seconds per window of 20: single-token listwise (one forward) vs generative listwise (prefill +
    greedy decoding of the permutation), same prompt ids; target: single-token >= 2x faster;
(b) a top-100 list by sliding windows (20/10) vs one full-list pass: prompt tokens and wall time;
    target: full list computes >= 40% fewer tokens;
(c) the sliding windows again with prefix reuse: the saving must equal (windows - 1) x prefix;
(d) groupwise streaming (groups through the query's prefix cache) over 100, 400 and 1,600
    candidates: peak KV-cache bytes and peak RSS (sampled), which must stay flat within 10%.

``quick`` shrinks everything for a smoke run (< 1 minute): its ratios are not the figures to quote.
Torch threads: ``$STREAMRANK_BENCH_THREADS`` (default 1: the machines are shared, see DESIGN.md).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamrank.context import PipelineContext
from streamrank.types import Candidate, Document, Query, Ranking

DATASET = "dl19-passage"


class RssSampler:
    """Peak resident memory of this process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        release_free_memory()
        self.start = self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS shows what is in use now
    (not what an earlier, bigger step left in the allocator)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def dl19_pool(limit: int) -> tuple[Query, list[Candidate]]:
    """The first DL19 query with its BM25 candidates (documents attached), repeated up to ``limit``."""
    from streamrank.datasets import load_dataset

    data = load_dataset(DATASET)
    pools = data.candidates("test") or {}
    query = next(q for q in data.queries("test") if len(pools.get(q.id, ())) >= 100)
    base = pools[query.id]
    pool = []
    for i in range(limit):
        source = base[i % len(base)]
        copy_no = i // len(base)
        doc_id = source.doc_id if copy_no == 0 else f"{source.doc_id}#{copy_no}"
        text = source.document.contents if source.document else ""
        pool.append(
            Candidate(doc_id=doc_id, score=-float(i), rank=i + 1, document=Document(id=doc_id, text=text))
        )
    return query, pool


@dataclass
class BenchInputs:
    """What every part shares: one loaded model (behind every stage), one query, one candidate pool."""

    context: PipelineContext
    query: Query
    pool: list[Candidate]
    model: str = "smollm2"
    """The LLM every stage's ``llm.model`` names (loaded once, shared through ``context``)."""

    def stage(self, kind: str, **options: Any) -> Any:
        from streamrank.compose import build_stage

        if "llm" in options:
            options["llm"] = {"model": self.model, **options["llm"]}
        # one prompt for every stage compared here, cut by max_passage_tokens (the published templates
        # differ per method and cut by words)
        options.setdefault("template", "streamrank")
        return build_stage({"kind": kind, **options}, self.context, f"bench {kind}")

    def run(self, stage: Any, size: int) -> tuple[Ranking, float]:
        ranking = Ranking(query=self.query, candidates=list(self.pool[:size]))
        started = time.perf_counter()
        out = stage.run([ranking])[0]
        return out, time.perf_counter() - started


def _window_calls(ranking: Ranking) -> list[Any]:
    return [c for c in ranking.calls if c.note.startswith("window")]


def part_window(inputs: BenchInputs, window: int, cap: int) -> dict[str, Any]:
    """(a) one window: single token vs generative, same prompt ids (no prefix cache on either side)."""
    options = {"window": window, "prefix_cache": False, "depth": window, "llm": {"max_passage_tokens": cap}}
    single, _ = inputs.run(inputs.stage("first", **options), window)
    gen, _ = inputs.run(inputs.stage("generative_listwise", **options), window)
    s_call, g_call = _window_calls(single)[0], _window_calls(gen)[0]
    return {
        "window": window,
        "prompt_tokens": s_call.prompt_tokens,
        "single_token_seconds": round(s_call.seconds, 3),
        "generative_seconds": round(g_call.seconds, 3),
        "generative_output_tokens": g_call.output_tokens,
        "speedup": round(g_call.seconds / s_call.seconds, 2),
        "target_met": g_call.seconds / s_call.seconds >= 2.0,
    }


def part_lists(inputs: BenchInputs, window: int, stride: int, top: int, cap: int) -> tuple[dict, dict]:
    """(b) sliding windows vs one full-list pass; (c) the sliding windows with prefix reuse."""
    llm = {"max_passage_tokens": cap}
    sliding_r, sliding_s = inputs.run(
        inputs.stage("first", window=window, stride=stride, prefix_cache=False, depth=top, llm=llm), top
    )
    full_r, full_s = inputs.run(
        inputs.stage("first", mode="full", prefix_cache=False, depth=top, llm=llm), top
    )
    reuse_r, reuse_s = inputs.run(
        inputs.stage("first", window=window, stride=stride, prefix_cache=True, depth=top, llm=llm), top
    )
    sliding_tokens = sum(c.prompt_tokens for c in sliding_r.calls)
    full_tokens = sum(c.prompt_tokens for c in full_r.calls)
    lists = {
        "candidates": top,
        "window": window,
        "stride": stride,
        "sliding_windows": len(_window_calls(sliding_r)),
        "sliding_prompt_tokens": sliding_tokens,
        "sliding_seconds": round(sliding_s, 2),
        "full_prompt_tokens": full_tokens,
        "full_seconds": round(full_s, 2),
        "token_reduction": round(1 - full_tokens / sliding_tokens, 3),
        "target_met": 1 - full_tokens / sliding_tokens >= 0.40,
        "notes": full_r.notes,
    }
    prefix_len = reuse_r.calls[0].prompt_tokens
    windows = len(_window_calls(reuse_r))
    reuse_tokens = sum(c.prompt_tokens for c in reuse_r.calls)
    reuse = {
        "windows": windows,
        "prefix_tokens": prefix_len,
        "prompt_tokens_without": sliding_tokens,
        "prompt_tokens_with": reuse_tokens,
        "saved": sliding_tokens - reuse_tokens,
        "expected_saving": (windows - 1) * prefix_len,
        "saving_matches": sliding_tokens - reuse_tokens == (windows - 1) * prefix_len,
        "prefix_share_of_tokens": round((windows - 1) * prefix_len / sliding_tokens, 3),
        "seconds_without": round(sliding_s, 2),
        "seconds_with": round(reuse_s, 2),
        "same_ranking": reuse_r.doc_ids() == sliding_r.doc_ids(),
    }
    return lists, reuse


def part_streaming(inputs: BenchInputs, sizes: Sequence[int], group_size: int, cap: int) -> dict[str, Any]:
    """(d) groupwise streaming through the prefix cache over growing lists: memory must stay flat."""
    stage = inputs.stage(
        "groupwise", group_size=group_size, anchors=2, depth=max(sizes), llm={"max_passage_tokens": cap}
    )
    rows = []
    for size in sizes:
        with RssSampler() as rss:
            ranking, seconds = inputs.run(stage, size)
        stats = stage.last_stats
        prefix_tokens = ranking.calls[0].prompt_tokens
        per_token = stats.peak_kv_bytes / (prefix_tokens + max(stats.prompt_tokens))
        rows.append(
            {
                "candidates": size,
                "groups": stats.groups,
                "seconds": round(seconds, 2),
                "peak_kv_mib": round(stats.peak_kv_bytes / 2**20, 3),
                "rss_before_mib": round(rss.start / 2**20, 1),
                "peak_rss_mib": round(rss.peak / 2**20, 1),
                "unbounded_kv_mib": round(per_token * (prefix_tokens + sum(stats.prompt_tokens)) / 2**20, 1),
            }
        )
    kv = [r["peak_kv_mib"] for r in rows]
    rss_values = [r["peak_rss_mib"] for r in rows]
    return {
        "group_size": group_size,
        "anchors": 2,
        "passage_tokens": cap,
        "rows": rows,
        "kv_spread": round(max(kv) / min(kv) - 1, 4),
        "rss_spread": round(max(rss_values) / min(rss_values) - 1, 4),
        "target_met": max(kv) / min(kv) <= 1.10 and max(rss_values) / min(rss_values) <= 1.10,
    }


def run_rerank_benchmark(
    output_dir: Path | None = None, quick: bool = False, model: str = "smollm2"
) -> dict[str, Any]:
    """Run parts (a)-(d) (module docstring) with the LLM ``model`` (a trained reranker's folder too);
    print a table, return the figures."""
    import torch

    from streamrank.rankers.causal_lm_loading import LLMSettings, load_causal_lm, resolve_device

    threads = int(os.environ.get("STREAMRANK_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    cap, group_cap = (12, 8) if quick else (48, 8)
    window, stride, top = (6, 3, 12) if quick else (20, 10, 100)
    sizes, group_size = ((12, 24, 48), 6) if quick else ((100, 400, 1600), 10)

    started = time.perf_counter()
    llm = load_causal_lm(LLMSettings(model=model), "cpu")
    load_seconds = time.perf_counter() - started
    context = PipelineContext(None)
    for passage_cap in (cap, group_cap):
        settings = LLMSettings(model=model, max_passage_tokens=passage_cap)
        context.shared(settings.cache_key(resolve_device(settings)), lambda: llm)
    query, pool = dl19_pool(max(top, *sizes))
    inputs = BenchInputs(context, query, pool, model)
    result: dict[str, Any] = {
        "model": llm.name,
        "torch_threads": threads,
        "max_passage_tokens": cap,
        "query": query.text,
        "quick": quick,
        "model_load_seconds": round(load_seconds, 2),
    }
    # streaming first: its RSS is then not inflated by the full-list pass's larger activations
    result["d_streaming_memory"] = part_streaming(inputs, sizes, group_size, group_cap)
    result["a_window"] = part_window(inputs, window, cap)
    result["b_full_vs_sliding"], result["c_prefix_reuse"] = part_lists(inputs, window, stride, top, cap)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    table = format_table(result)
    print(table)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "rerank_table.md").write_text(table + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The figures as a markdown table."""
    a, b, c, d = (
        result[k] for k in ("a_window", "b_full_vs_sliding", "c_prefix_reuse", "d_streaming_memory")
    )
    lines = [
        f"Rerank benchmark: {result['model']}, {result['torch_threads']} torch thread(s), passages cut to "
        f"{result['max_passage_tokens']} tokens, query {result['query']!r}"
        + (" (QUICK: smoke sizes)" if result["quick"] else ""),
        "",
        "| part | measure | value |",
        "| --- | --- | --- |",
        f"| (a) window {a['window']} | single-token s/window | {a['single_token_seconds']} |",
        f"| | generative s/window ({a['generative_output_tokens']} tokens out) | {a['generative_seconds']} |",
        f"| | speedup (target >= 2x) | {a['speedup']}x {'ok' if a['target_met'] else 'MISSED'} |",
        f"| (b) top-{b['candidates']} | sliding {b['window']}/{b['stride']}: {b['sliding_windows']} windows, prompt tokens / s | {b['sliding_prompt_tokens']} / {b['sliding_seconds']} |",
        f"| | full list, one pass: prompt tokens / s | {b['full_prompt_tokens']} / {b['full_seconds']} |",
        f"| | fewer tokens (target >= 40%) | {b['token_reduction']:.1%} {'ok' if b['target_met'] else 'MISSED'} |",
        f"| (c) prefix reuse | prompt tokens without / with | {c['prompt_tokens_without']} / {c['prompt_tokens_with']} |",
        f"| | saved vs (windows-1) x prefix = {c['windows'] - 1} x {c['prefix_tokens']} | {c['saved']} vs {c['expected_saving']} {'ok' if c['saving_matches'] else 'MISMATCH'} |",
        f"| | seconds without / with; same ranking | {c['seconds_without']} / {c['seconds_with']}; {c['same_ranking']} |",
    ]
    for row in d["rows"]:
        lines.append(
            f"| (d) stream {row['candidates']} candidates | {row['groups']} groups: peak KV MiB / peak RSS MiB / s "
            f"(one unbounded cache: {row['unbounded_kv_mib']} MiB) | {row['peak_kv_mib']} / {row['peak_rss_mib']} / {row['seconds']} |"
        )
    lines.append(
        f"| | spread KV / RSS (target <= 10%; passages cut to {d['passage_tokens']} tokens, groups of {d['group_size']} with 2 anchors) | {d['kv_spread']:.1%} / {d['rss_spread']:.1%} "
        f"{'ok' if d['target_met'] else 'MISSED'} |"
    )
    lines.append(
        f"| total | seconds (model load {result['model_load_seconds']}) | {result['total_seconds']} |"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes")
    parser.add_argument("--output", help="folder for rerank_table.md")
    args = parser.parse_args(argv)
    run_rerank_benchmark(Path(args.output) if args.output else None, args.quick)


if __name__ == "__main__":
    main()
