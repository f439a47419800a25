"""Evaluation: dataset loaders (``datasets``), metrics (``metrics``), the eval runner and report
(``runner``), TREC run files (``trec``) and benchmarks (``bench``). Submodules import lazily."""
