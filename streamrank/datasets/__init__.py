"""Benchmark datasets: BEIR folders, reranking sets with given candidates (TREC-DL) and BRIGHT.

``load_dataset(ref)`` looks, in this order:

1. ``ref`` as a local folder (a BEIR-layout folder, or ``<BRIGHT folder>/<subset>``);
2. ``ref`` as a name under each folder of ``$STREAMRANK_DATASETS`` (``os.pathsep``-separated), up to
   two folder levels down: ``scifact`` finds ``<root>/beir/scifact``, ``cranfield`` finds
   ``<root>/classic/cranfield``, ``beir/scifact`` works too;
3. the same under the download cache ``$STREAMRANK_HOME/datasets``;
4. a download into that cache, unless ``STREAMRANK_OFFLINE=1``: BEIR names from the official BEIR
   URL, ``bright/<subset>`` through Hugging Face ``datasets`` (``xlangai/BRIGHT``).

Layouts read:

- BEIR: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/<split>.tsv`` (header ``query-id corpus-id score``; 4-column TREC qrels also accepted).
- Reranking form: the same without ``corpus.jsonl``, plus candidate lists (``bm25_top100.json``:
  ``[{"query": text | {"text", "qid"}, "hits": [{"qid", "docid", "rank", "score", "content"}]}]``,
  or a TREC run such as ``bm25_top100.trec``).
- BRIGHT: a folder named ``bright`` holding ``documents/<subset>`` (``id``, ``content``) and
  ``examples/<subset>`` (``id``, ``query``, ``gold_ids``, ``excluded_ids``) as ``.jsonl``,
  ``.parquet`` or the Hub's ``<subset>-00000-of-00001.parquet``; referred to as ``bright/<subset>``.
  One split, ``test``; every gold id has relevance 1; ``excluded_ids`` are dropped before scoring.
"""

from streamrank.datasets.discovery import SEARCH_DEPTH, corpus_key, dataset_roots, load_dataset, slug
from streamrank.datasets.download import BEIR_NAMES, BEIR_URL, BRIGHT_SUBSETS, cache_dir, offline
from streamrank.datasets.formats import (
    DEFAULT_CANDIDATE_FILES,
    BeirDataset,
    BrightDataset,
    Dataset,
    DocumentLookup,
    load_candidates,
    read_qrels,
    refuse_test_split,
)
from streamrank.datasets.trec import ranked_scores, read_trec_run, write_trec_run

__all__ = [
    "BEIR_NAMES",
    "BEIR_URL",
    "BRIGHT_SUBSETS",
    "DEFAULT_CANDIDATE_FILES",
    "SEARCH_DEPTH",
    "BeirDataset",
    "BrightDataset",
    "Dataset",
    "DocumentLookup",
    "cache_dir",
    "corpus_key",
    "dataset_roots",
    "load_candidates",
    "load_dataset",
    "offline",
    "ranked_scores",
    "read_qrels",
    "read_trec_run",
    "refuse_test_split",
    "slug",
    "write_trec_run",
]
