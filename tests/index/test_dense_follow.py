"""A reader of a dense index (another process's pipeline or shard replica) follows the writer's
generation: appended records are applied without reading the index files again, deletes too, and a
rebuild is opened anew; searches always see exactly the writer's acknowledged state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from index_support import context_for, dense
from test_dense_segments import Corpus, run, vector


def test_reader_applies_appended_records_without_reopening(tmp_path: Path, minilm: Any) -> None:
    writer = Corpus(tmp_path, minilm, n=50)
    reader = dense(context_for(tmp_path, minilm), k=10)
    assert run(reader, np.stack([vector("d7")]), k=1) == [["d7"]]
    opened = reader._state
    writer.add(["new-1", "new-2"])
    assert run(reader, np.stack([vector("new-2")]), k=1) == [["new-2"]]
    assert reader._state is opened  # followed the log: the base files were not read again
    writer.delete(["d7", "new-1"])
    assert "d7" not in run(reader, np.stack([vector("d7")]), k=10)[0]
    assert reader._state is opened and sorted(reader.indexed_ids()) == sorted(writer.vectors)
    with writer.stage.supply_embeddings(writer.vectors):
        writer.stage.build(writer.ctx.store, rebuild=True)  # a new build: the reader opens it anew
    query = np.stack([vector("new-2")])
    assert run(reader, query, k=5) == run(writer.stage, query, k=5) == [writer.exact(query[0], 5)]
    assert reader._state is not opened
