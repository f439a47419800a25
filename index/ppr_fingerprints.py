"""Monte Carlo fingerprint files of a corpus graph (the ``ppr`` stage's ``solver = "montecarlo"``).

Fingerprints are stored beside the graph, one ``fingerprints-<digest>.npz`` per walk setting (so
configurations can share a graph); a file records the graph version it was walked on and is stale
for any other. The walks themselves are :func:`~streamrank.index.ppr_solvers.build_fingerprints`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streamrank.index.ppr_solvers import build_fingerprints, carry_fingerprints

if TYPE_CHECKING:
    import scipy.sparse as sp


@dataclass(frozen=True)
class WalkSettings:
    """What the fingerprints depend on besides the graph itself."""

    alpha: float
    walks: int
    max_length: int
    seed: int
    edges: str | None
    """The user edge list file (its content digest goes into the file name)."""
    edge_weight: float
    lexical_weight: float | None
    """None for graphs without lexical edges (keeps the file names they had before the option)."""

    def path(self, folder: Path) -> Path:
        """The fingerprint file of these settings in the graph folder ``folder``."""
        from streamrank.index.graph import file_digest

        key = {
            "alpha": self.alpha,
            "walks": self.walks,
            "max_length": self.max_length,
            "seed": self.seed,
            "edges": file_digest(self.edges) if self.edges else None,
            "edge_weight": self.edge_weight,
        }
        if self.lexical_weight is not None:
            key["lexical_weight"] = self.lexical_weight
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return folder / f"fingerprints-{digest}.npz"

    def compute(self, P: sp.csr_matrix, sources: np.ndarray | None = None, salt: int = 0) -> sp.csr_matrix:
        """Walk from ``sources`` (default: every node); ``salt`` shifts the random seed."""
        return build_fingerprints(
            P,
            alpha=self.alpha,
            walks=self.walks,
            max_length=self.max_length,
            seed=self.seed + salt,
            sources=sources,
        )

    def carry(
        self,
        F: sp.csr_matrix,
        P: sp.csr_matrix,
        version: str,
        changed: np.ndarray,
        kept: np.ndarray | None,
    ) -> sp.csr_matrix:
        """``F`` carried over an update to the graph with transition matrix ``P`` and ``version``: the
        rows whose walks touched a changed node are re-walked (see ``carry_fingerprints``)."""

        def walk(sources: np.ndarray | None) -> sp.csr_matrix:
            if sources is None:
                return self.compute(P)
            salt = int(version[:8], 16)  # fresh randomness for re-walked rows
            return self.compute(P, sources=sources, salt=salt)

        return carry_fingerprints(F, P.shape[0], changed, kept, walk)


def load_fingerprints(path: Path, version: str) -> sp.csr_matrix | None:
    """The fingerprints in ``path`` if they were walked on graph ``version``, else None."""
    from streamrank.index.graph import load_sparse

    if not path.exists():
        return None
    F, meta, _ = load_sparse(path)
    return F if meta.get("graph_version") == version else None


def save_fingerprints(path: Path, F: sp.csr_matrix, version: str) -> None:
    """Write ``F`` (walked on graph ``version``) to ``path`` atomically."""
    from streamrank.index.graph import save_sparse

    save_sparse(path, F, {"graph_version": version})
