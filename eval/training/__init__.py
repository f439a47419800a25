"""Training and tuning on a train split (never on test).

- :mod:`~streamrank.eval.training.ranker`: ``streamrank train-ranker``, the learned (lambdarank) stage;
- :mod:`~streamrank.eval.training.tune`: ``streamrank tune``, a cross-validated grid search of one stage;
- :mod:`~streamrank.eval.training.rerankers`: ``streamrank train-reranker``, the one-pass rerankers'
  training recipes (FIRST and groupwise: :mod:`~streamrank.eval.training.llm_student`; E2Rank:
  :mod:`~streamrank.eval.training.encoder_student`) on examples from
  :mod:`~streamrank.eval.training.examples`, with the losses of :mod:`~streamrank.eval.training.losses`
  and the loop (checkpoints, resume) of :mod:`~streamrank.eval.training.loop`.
"""

from streamrank.eval.training.ranker import fit_ranker_model, save_ranker_model, train_ranker
from streamrank.eval.training.rerankers import RerankerTraining, train_reranker
from streamrank.eval.training.tune import (
    CV_REPEATS,
    cross_validated_gain,
    grid_points,
    parse_grid,
    render_summary,
    tune_stage,
)

__all__ = [
    "CV_REPEATS",
    "RerankerTraining",
    "cross_validated_gain",
    "fit_ranker_model",
    "grid_points",
    "parse_grid",
    "render_summary",
    "save_ranker_model",
    "train_ranker",
    "train_reranker",
    "tune_stage",
]
