"""`streamrank` command line: index, search, eval, serve, bench, train-ranker, train-reranker, tune, compress.

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

    from streamrank.compose import load_pipeline

    pipeline = load_pipeline(args.pipeline, corpus=args.dataset or args.corpus, index_dir=args.index_dir)
    started = time.perf_counter()
    if args.ray or args.address:  # dense encoding with Ray Data (streamrank.service.ray_encode)
        from streamrank.service.ray_encode import index_on_ray
        from streamrank.service.ray_serve import start_ray
        from streamrank.service.ray_settings import RaySettings

        start_ray(RaySettings(address=args.address))
        encoded = index_on_ray(pipeline, rebuild=args.rebuild, actors=args.ray_actors, gpus_per_actor=args.ray_gpus)
        print(f"encoded with Ray Data: {encoded or 'nothing (every dense index exists)'}", file=sys.stderr)
    else:
        pipeline.index(rebuild=args.rebuild)
    print(
        f"indexed {len(pipeline.context.store)} documents for {pipeline.name!r} into "
        f"{pipeline.context.index_dir} in {time.perf_counter() - started:.1f} s"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from streamrank.compose import load_pipeline

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
        top=args.top,
        from_stage=args.from_stage,
    )
    print(json.dumps(result["metrics"], indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from streamrank.service.app import serve
    from streamrank.service.settings import load_settings

    settings = load_settings(
        args.config, pipelines=args.pipeline, host=args.host, port=args.port, corpus=args.corpus, index_dir=args.index_dir
    )
    if args.ray or args.address or settings.ray is not None:  # Ray is imported only here
        from streamrank.service.ray_serve import run_on_ray, with_ray

        run_on_ray(with_ray(settings, args.address))
        return 0
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

    name = f"{args.name}-ray" if args.ray else args.name  # `bench service --ray` is `service-ray`
    options: dict[str, object] = {"pipelines": args.pipelines.split(",")} if args.pipelines else {}
    if args.model:
        options["model"] = args.model
    if args.sizes:
        options["sizes"] = [int(s) for s in args.sizes.split(",")]
    run_benchmark(name, output_dir=Path(args.output) if args.output else None, quick=args.quick, **options)
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


def cmd_train_reranker(args: argparse.Namespace) -> int:
    from streamrank.eval.training import RerankerTraining, train_reranker

    options = RerankerTraining(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        full=args.full,
        lora_rank=args.lora_rank,
        layers=args.layers,
        list_size=args.list_size,
        checkpoint_every=args.checkpoint_every,
        pseudo_queries=args.pseudo_queries,
        generator=args.generator,
        dtype=args.dtype,
        order=args.order,
        heldout=args.heldout,
    )
    path = train_reranker(
        dataset=args.dataset,
        pipeline=args.pipeline,
        split=args.split,
        stage=args.stage,
        teacher=args.teacher,
        output=Path(args.output) if args.output else None,
        limit=args.limit,
        resume=args.resume,
        options=options,
    )
    print(f"reranker written to {path} (see {path / 'training.json'})")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from streamrank.eval.compress import CompressOptions, compress_model_folder, summary

    calibration = None if args.calibration in ("none", "") else args.calibration
    options = CompressOptions(
        ratio=args.ratio, calibration=calibration, heal=args.heal, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, max_length=args.max_length, texts=args.texts,
        text_count=args.text_count, seed=args.seed, device=args.device,
    )  # fmt: skip
    print(summary(compress_model_folder(args.model, Path(args.output), options)))
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


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from streamrank.errors import StreamRankError
    from streamrank.eval.metrics import paired_comparison

    runs = []
    for folder in (args.baseline, args.run):
        path = Path(folder) / "per_query.json"
        if not path.is_file():
            raise StreamRankError(f"{folder}: no per_query.json (is it a `streamrank eval` output folder?)")
        runs.append(json.loads(path.read_text()))
    try:
        c = paired_comparison(runs[0], runs[1], args.measure)
    except (KeyError, ValueError) as exc:
        raise StreamRankError(f"cannot compare {args.baseline} and {args.run}: {exc}") from None
    print(json.dumps(c) if args.json else (
        f"{args.measure} over {c['queries']} queries: {c['a']:.4f} -> {c['b']:.4f}, {c['difference']:+.4f} "
        f"(paired SE {c['se']:.4f}, t-test p {c['p']:.3g}; {c['up']} up, {c['down']} down, {c['same']} same)"
    ))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from streamrank.eval.report import report

    stale = report(Path(args.root), check=args.check)
    for page in stale:
        print(f"{page}: {'out of date (run `streamrank report`)' if args.check else 'rewritten'}")
    if not stale:
        print("results pages match the reproducibility tables")
    return 1 if args.check and stale else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="build the indexes a pipeline needs over its corpus")
    _add_pipeline_args(p)
    p.add_argument("--dataset", help="alias of --corpus")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if an index exists")
    p.add_argument("--ray", action="store_true", help="encode the corpus with Ray Data (needs streamrank[ray])")
    p.add_argument("--address", help="with --ray: the cluster to join (default: a local head)")
    p.add_argument("--ray-actors", type=int, default=2, help="with --ray: encoder actors (default 2)")
    p.add_argument("--ray-gpus", type=float, default=0.0, help="with --ray: GPUs per encoder actor (default 0)")
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
    p.add_argument("--top", type=int, help="rank as a request for the best TOP does (the serving path); default: full depth")
    p.add_argument(
        "--from-stage",
        help="run the pipeline's stages from the one of this name on, over the supplied candidates "
        "(a reranking-form dataset's pool or --candidates)",
    )
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
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve (needs streamrank[ray]; `ray = {...}` in the settings)")
    p.add_argument("--address", help="with --ray: the Ray cluster to join (default: start a local head)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="run a benchmark: " + "rerank, kernels, kernels-kv, kernels-latency, ppr, service, soak, retrieval, writes")
    p.add_argument("name")
    p.add_argument("--output", "-o", help="folder to write NAME.json into")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--ray", action="store_true", help="service: beside the same servers on Ray Serve (needs streamrank[ray])")
    p.add_argument("--pipelines", help="service: comma-separated configs to measure (default: bm25,dense,hybrid,ppr)")
    p.add_argument("--model", help="rerank: the LLM, e.g. a trained reranker's folder (default: smollm2)")
    p.add_argument("--sizes", help="writes: comma-separated corpus sizes (default: 10000,100000,1000000)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train-ranker", help="train a pipeline's learned ranker on a train split")
    p.add_argument("--dataset", "-d", required=True)
    p.add_argument("--pipeline", "-p", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--output", help="model path (default: the one the pipeline names)")
    p.add_argument("--limit", type=int)
    p.set_defaults(func=cmd_train_ranker)

    p = sub.add_parser("train-reranker", help="train a pipeline's one-pass reranker (FIRST, groupwise, E2Rank)")
    p.add_argument("--dataset", "-d", required=True)
    p.add_argument("--pipeline", "-p", required=True)
    p.add_argument("--split", default="train", help="without qrels for it: pseudo-queries from the corpus")
    p.add_argument("--stage", help="top-level stage name (default: the last first/groupwise/e2rank stage)")
    p.add_argument("--teacher", help="pipeline whose order ranks the unjudged candidates (default: the first stage)")
    p.add_argument("--output", "-o", help="model folder (default: $STREAMRANK_HOME/models/trained/...)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--limit", type=int, help="first N judged queries (or N pseudo-queries)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    p.add_argument("--full", action="store_true", help="train every weight of the LLM (GPU), not LoRA")
    p.add_argument("--batch-size", type=int, help="examples per step (default: 1 prompt, 4 queries for E2Rank)")
    p.add_argument("--lr", type=float, help="learning rate (default: 2e-4 LoRA, 1e-5 full, 2e-5 E2Rank)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=8, help="LoRA on the top N layers (0: all)")
    p.add_argument("--list-size", type=int, default=8, help="E2Rank: candidates per query in the listwise loss")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument(
        "--pseudo-queries",
        choices=["titles", "generated"],
        default="titles",
        help="a split without qrels: queries from titles (first sentences), or questions an LLM writes (GPL)",
    )
    p.add_argument("--generator", default="smollm2", help="--pseudo-queries generated: the causal LM (default smollm2)")
    p.add_argument(
        "--order",
        choices=["shuffled", "first-stage"],
        default="shuffled",
        help="FIRST/groupwise: passages of each example shuffled (the recipe) or in the first stage's order",
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=0,
        help="FIRST/groupwise: keep N examples out of training; training.json reports how the trained and untrained model order them",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="forward-pass compute dtype (default auto: bfloat16 autocast where the CPU/GPU runs it natively)",
    )
    p.set_defaults(func=cmd_train_reranker)

    p = sub.add_parser("compare", help="paired comparison of two eval output folders over their shared queries")
    p.add_argument("baseline", help="eval output folder (per_query.json) of the run compared against")
    p.add_argument("run", help="eval output folder of the run compared")
    p.add_argument("--measure", default="nDCG@10")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="regenerate the README's results sections and docs/results.md from the tables")
    p.add_argument("--root", default=".", help="the checkout (default: the current folder)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page is out of date")
    p.set_defaults(func=cmd_report)

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

    p = sub.add_parser("compress", help="SVD-compress a model (optionally heal it by distillation); save its factors")
    p.add_argument("--model", "-m", required=True, help="encoder or causal LM (name, folder, .gguf, smollm2)")
    p.add_argument("--ratio", type=float, required=True, help="share of each linear layer's parameters kept")
    p.add_argument("--calibration", default="auto", help="whitening texts: auto (SciFact), dataset, file; none: plain SVD")
    p.add_argument("--heal", action="store_true", help="distil toward the dense model, training the factors only")
    p.add_argument("--steps", type=int, default=200, help="with --heal: optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=128, help="tokens per healing text")
    p.add_argument("--texts", help="healing texts (default: the calibration source)")
    p.add_argument("--text-count", type=int, default=2000, help="healing texts read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: CUDA when available, else CPU")
    p.add_argument("--output", "-o", required=True, help="folder for the factors and compress.json")
    p.set_defaults(func=cmd_compress)
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
