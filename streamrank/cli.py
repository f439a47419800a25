"""`streamrank` command line: index, search, eval, serve, bench, train-ranker, tune.

Each command parses its flags and calls one library function; no logic lives here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from streamrank.errors import StreamRankError


def _add_pipeline_args(parser: argparse.ArgumentParser, default: str | None = "configs/hybrid.toml") -> None:
    parser.add_argument("--pipeline", "-p", default=default, help="pipeline TOML (path or name in configs/)")
    parser.add_argument("--corpus", help="dataset name or folder to index/search (overrides the file)")
    parser.add_argument("--index-dir", help="where the indexes live (default: $STREAMRANK_HOME/indexes/<corpus>)")


def cmd_index(args: argparse.Namespace) -> int:
    import time

    from streamrank.config import load_pipeline

    pipeline = load_pipeline(args.pipeline, corpus=args.dataset or args.corpus, index_dir=args.index_dir)
    started = time.perf_counter()
    pipeline.index(rebuild=args.rebuild)
    print(
        f"indexed {len(pipeline.context.store)} documents for {pipeline.name!r} into "
        f"{pipeline.context.index_dir} in {time.perf_counter() - started:.1f} s"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from streamrank.config import load_pipeline

    pipeline = load_pipeline(args.pipeline, corpus=args.corpus, index_dir=args.index_dir)
    ranking = pipeline.search(args.query, k=args.k)
    if args.json:
        from streamrank.serialize import ranking_to_dict

        print(json.dumps(ranking_to_dict(ranking), indent=2))
        return 0
    for cand in ranking.candidates:
        title = (cand.document.title or cand.document.text[:80]) if cand.document else ""
        print(f"{cand.rank:>3}  {cand.score:10.4f}  {cand.doc_id:<20} {title}")
    timings = ", ".join(f"{name} {ms:.0f} ms" for name, ms in ranking.timings_ms.items())
    print(f"({timings})", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from streamrank.eval.runner import check_reproducibility, run_eval

    if args.check:
        return check_reproducibility(
            table=args.table, only=args.only, limit=args.limit, output=Path(args.output) if args.output else None
        )
    if not args.dataset or not args.pipeline or not args.output:
        raise StreamRankError("eval needs --dataset, --pipeline and --output (or --check)")
    result = run_eval(
        dataset=args.dataset,
        pipeline=args.pipeline,
        output=Path(args.output),
        split=args.split,
        limit=args.limit,
        candidates=args.candidates,
        batch_size=args.batch_size,
        index_dir=args.index_dir,
        compare=[Path(p) for p in args.compare],
    )
    print(json.dumps(result["metrics"], indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from streamrank.service.app import serve

    serve(
        pipelines=args.pipeline,
        host=args.host,
        port=args.port,
        corpus=args.corpus,
        index_dir=args.index_dir,
        config=args.config,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from streamrank.eval.bench import run_benchmark

    run_benchmark(args.name, output_dir=Path(args.output) if args.output else None, quick=args.quick)
    return 0


def cmd_train_ranker(args: argparse.Namespace) -> int:
    from streamrank.eval.training import train_ranker

    path = train_ranker(
        dataset=args.dataset,
        pipeline=args.pipeline,
        split=args.split,
        output=Path(args.output) if args.output else None,
        limit=args.limit,
    )
    print(f"ranker written to {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from streamrank.eval.training import parse_grid, render_summary, tune_stage

    result = tune_stage(
        dataset=args.dataset,
        pipeline=args.pipeline,
        grid=parse_grid(args.grid),
        split=args.split,
        stage=args.stage,
        measure=args.measure,
        folds=args.folds,
        limit=args.limit,
        output=Path(args.output) if args.output else None,
    )
    print(render_summary(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="build the indexes a pipeline needs over its corpus")
    _add_pipeline_args(p)
    p.add_argument("--dataset", help="alias of --corpus")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if an index exists")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="run one query through a pipeline")
    _add_pipeline_args(p)
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the ranking as JSON (same shape as HTTP /search)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="evaluate a pipeline on a dataset (or --check the reproducibility table)")
    p.add_argument("--dataset", "-d", help="dataset name (looked up in $STREAMRANK_DATASETS) or folder")
    p.add_argument("--pipeline", "-p")
    p.add_argument("--output", "-o", help="folder for metrics.json, run.trec, report.md")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="evaluate only the first N queries")
    p.add_argument("--candidates", help="candidate file (JSON hits or TREC run) to rerank instead of retrieving")
    p.add_argument("--batch-size", type=int, default=1, help="queries per pipeline call (1 = true per-query latency)")
    p.add_argument("--index-dir")
    p.add_argument("--compare", nargs="*", default=[], help="earlier output folders to chart beside this run")
    p.add_argument("--check", action="store_true", help="run the reproducibility table and compare to expected")
    p.add_argument("--table", help="reproducibility table (default: the packaged one)")
    p.add_argument("--only", help="with --check: rows whose dataset or pipeline contains this text")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="serve pipelines over HTTP")
    p.add_argument("--pipeline", "-p", action="append", help="pipeline TOML; repeat to serve several")
    p.add_argument("--corpus")
    p.add_argument("--index-dir")
    p.add_argument("--host", default=None, help="default 127.0.0.1 (or $STREAMRANK_HOST)")
    p.add_argument("--port", type=int, default=None, help="default 8000 (or $STREAMRANK_PORT)")
    p.add_argument("--config", help="service settings TOML (or $STREAMRANK_SERVICE_CONFIG)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="run a benchmark: " + "rerank, kernels, ppr, service, soak, retrieval")
    p.add_argument("name")
    p.add_argument("--output", "-o", help="folder to write NAME.json into")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train-ranker", help="train a pipeline's learned ranker on a train split")
    p.add_argument("--dataset", "-d", required=True)
    p.add_argument("--pipeline", "-p", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--output", help="model path (default: the one the pipeline names)")
    p.add_argument("--limit", type=int)
    p.set_defaults(func=cmd_train_ranker)

    p = sub.add_parser("tune", help="grid-search one stage's query-time options on a train split")
    p.add_argument("--dataset", "-d", required=True)
    p.add_argument("--pipeline", "-p", required=True)
    p.add_argument("--grid", "-g", action="append", required=True, help="OPTION=V1,V2,... (repeat for more)")
    p.add_argument("--stage", help="top-level stage name (default: the last)")
    p.add_argument("--split", default="train")
    p.add_argument("--measure", default="nDCG@10")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--limit", type=int)
    p.add_argument("--output", "-o", help="folder to write tune.json into")
    p.set_defaults(func=cmd_tune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StreamRankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
