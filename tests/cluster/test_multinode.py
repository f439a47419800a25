"""The service on a local multi-node Ray cluster (``ray.cluster_utils.Cluster``): a head for the ingress,
the writer and the pipeline replicas, and two worker nodes with a ``shard_host`` resource, so each shard
deployment has one replica on each worker node.

Checked: the same rankings as the in-process pipeline; kill tests under load (an ingress replica, the
writer, a shard replica, a whole node removed and a new one added): searches answered 200 or 503 with
``Retry-After`` (never a 500), every acknowledged write found afterwards, rankings identical once Serve
has recovered, and how long each took to recover (printed and summarised).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cluster_support import RAY_MISSING, free_port, local_pipeline, wait_ready

pytest.importorskip("ray.serve", reason=RAY_MISSING)

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from streamrank.types import Document  # noqa: E402

pytestmark = pytest.mark.slow
SHARDS = 2
APP = "streamrank"


@pytest.fixture(scope="module")
def cluster(corpus: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """Head (2 CPUs, ``head`` resource) and two worker nodes (1 CPU, ``shard_host = 2`` each); the service
    deployed with ``shards = 2``, 2 replicas per shard, at most one per node."""
    from streamrank.compose import load_pipeline
    from streamrank.service.ray_serve import PASSED_ENV, deploy, serve_environment, undeploy
    from streamrank.service.ray_settings import RaySettings
    from streamrank.service.settings import load_settings

    sharded = Path(corpus.dense).with_name("dense-s2.toml")
    sharded.write_text(f'name = "dense-s2"\nshards = {SHARDS}\n[[stages]]\nkind = "dense"\nk = 100\n')
    built = load_pipeline(sharded, index_dir=corpus.index)
    built.index()  # the 2-shard split takes the "dense" index's vectors (no encoding)
    built.close()

    import os

    serve_environment()  # before the nodes start: their processes (the HTTP proxy) inherit it
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 100}, "include_dashboard": False})
    workers = [head.add_node(num_cpus=1, resources={"shard_host": 2}) for _ in range(2)]
    ray.init(
        address=head.address, namespace="streamrank-multinode", log_to_driver=False,
        runtime_env={"env_vars": {k: os.environ[k] for k in PASSED_ENV if k in os.environ}},
    )
    on_head = {"resources": {"head": 0.01}, "num_cpus": 0.1}
    ray_settings = RaySettings(
        namespace="streamrank-multinode",
        replicas=1,
        **on_head,
        ingress={"replicas": 2, **on_head},
        writer=on_head,
        shard={"replicas": 2, "num_cpus": 0.1, "resources": {"shard_host": 1}, "max_replicas_per_node": 1},
        call_timeout_s=20,
    )
    settings = load_settings(
        env={}, pipelines=[str(sharded)], index_dir=str(corpus.index), port=free_port(), torch_threads=1,
        max_batch_size=8, batch_window_ms=20, ray=ray_settings,
    )
    started = time.monotonic()
    url = deploy(settings, proxy_location="HeadOnly")
    wait_ready(url, timeout=600)
    yield SimpleNamespace(url=url, head=head, workers=workers, startup_s=time.monotonic() - started, sharded=sharded)
    undeploy(settings)
    serve.shutdown()
    ray.shutdown()
    head.shutdown()


def search(url: str, query: str, k: int = 10) -> httpx.Response:
    return httpx.post(f"{url}/search", json={"query": query, "k": k, "pipeline": "dense-s2"}, timeout=120)


def hits(reply: httpx.Response) -> list[tuple[str, float]]:
    return [(r["id"], r["score"]) for r in reply.json()["results"]]


def running(deployment: str) -> int:
    app = serve.status().applications.get(APP)
    return 0 if app is None or deployment not in app.deployments else app.deployments[deployment].replica_states.get("RUNNING", 0)


def replica_actors(deployment: str) -> list[str]:
    from ray.util import list_named_actors

    return sorted(
        a["name"] for a in list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]
    )


def shard_nodes(shard: int) -> set[str]:
    handle = serve.get_deployment_handle(f"shard-dense-s2-{shard}", app_name=APP)
    return {handle.status.remote().result(timeout_s=60)["node"] for _ in range(12)}


def assert_same_rankings(url: str, path: Path, corpus: SimpleNamespace, minilm: Any, queries: list[str]) -> None:
    """The cluster's (id, score) lists equal those of the pipeline at ``path`` run in this process."""
    pipeline = local_pipeline(path, corpus.index, minilm)
    try:
        for query in queries:
            expected = [(c.doc_id, c.score) for c in pipeline.search(query, k=10).candidates]
            reply = search(url, query)
            assert reply.status_code == 200, reply.text
            assert hits(reply) == expected, query
    finally:
        pipeline.close()


class Load:
    """Clients searching and one writer upserting while something is killed; every answer's code kept."""

    def __init__(self, url: str, queries: list[str], tag: str, texts: list[str], offset: int, clients: int = 3) -> None:
        self.url, self.queries, self.tag, self.texts, self.offset = url, queries, tag, texts, offset
        self.codes: list[tuple[float, str, int]] = []
        """(time sent, kind, status) of every request."""
        self.acked: list[Document] = []
        self.resent = 0
        """Requests the HTTP proxy sent again because the replica running them died."""
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.searcher, args=(n,)) for n in range(clients)]
        self.threads.append(threading.Thread(target=self.writer))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def record(self, sent: float, kind: str, reply: httpx.Response) -> None:
        """A 503 without ``Retry-After`` is kept as -503 (the checks accept 200 and 503 only)."""
        code = reply.status_code
        self.resent += "X-StreamRank-Resent" in reply.headers
        self.codes.append((sent, kind, -code if code == 503 and "Retry-After" not in reply.headers else code))

    def searcher(self, n: int) -> None:
        i = n
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                self.record(sent, "search", search(self.url, self.queries[i % len(self.queries)], k=5))
            except httpx.HTTPError:
                self.codes.append((sent, "search", 0))
            i += 1

    def writer(self) -> None:
        i = 0
        while not self.stop.is_set():
            # a distinct text per write (a SciFact abstract's opening), so a search can find each one
            source = self.texts[(self.offset + i) % len(self.texts)]
            doc = Document(id=f"{self.tag}-{i}", title="", text=f"{source} (copy {self.tag} {i})")
            sent = time.monotonic()
            try:
                reply = httpx.post(f"{self.url}/documents", json={"documents": [doc.__dict__], "pipeline": "dense-s2"}, timeout=120)
                self.record(sent, "write", reply)
                if reply.status_code == 200:
                    self.acked.append(doc)
            except httpx.HTTPError:
                self.codes.append((sent, "write", 0))
            i += 1
            time.sleep(0.3)

    def first_ok_after(self, at: float, kind: str) -> float | None:
        """Seconds from ``at`` to the first 200 of ``kind`` after a non-200 one (0 when none failed)."""
        after = [(t, c) for t, k, c in self.codes if k == kind and t >= at]
        failed = [t for t, c in after if c != 200]
        if not failed:
            return 0.0
        ok = [t for t, c in after if c == 200 and t > failed[0]]
        return ok[0] - at if ok else None

    def summary(self) -> str:
        counts: dict[tuple[str, int], int] = {}
        for _, kind, code in self.codes:
            counts[(kind, code)] = counts.get((kind, code), 0) + 1
        return ", ".join(f"{kind} {code}: {n}" for (kind, code), n in sorted(counts.items()))


def check_acked(url: str, acked: list[Document]) -> None:
    for doc in acked:
        reply = httpx.get(f"{url}/documents/{doc.id}", params={"pipeline": "dense-s2"}, timeout=60)
        assert reply.status_code == 200, (doc.id, reply.text)
        found = search(url, doc.text, k=5)
        assert found.status_code == 200 and doc.id in [r["id"] for r in found.json()["results"]], doc.id


def wait_for(condition: Any, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "no recovery in time"
        time.sleep(0.5)
    return time.monotonic() - started


def test_shards_on_different_nodes_and_rankings_as_in_process(
    cluster: SimpleNamespace, corpus: SimpleNamespace, docs: list[Document], minilm: Any, summary_line: Any
) -> None:
    summary_line(f"multi-node: 3 nodes, application ready in {cluster.startup_s:.0f} s")
    for shard in range(SHARDS):
        assert running(f"shard-dense-s2-{shard}") == 2
        assert len(shard_nodes(shard)) == 2  # one replica on each worker node
    queries = [docs[i].title for i in range(0, 200, 40)] + ["vitamin D"]
    assert_same_rankings(cluster.url, corpus.dense, corpus, minilm, queries)  # the unsharded index, in process


@pytest.mark.parametrize("victim", ["ingress", "writer", "shard-dense-s2-0"])
def test_killed_replica_under_load(
    cluster: SimpleNamespace, corpus: SimpleNamespace, docs: list[Document], minilm: Any, summary_line: Any, victim: str
) -> None:
    queries = [docs[i].title for i in range(0, 200, 25)]
    before = replica_actors(victim)
    assert before, victim
    texts = [d.text[:300] for d in docs]
    offset = 50 * ["ingress", "writer", "shard-dense-s2-0"].index(victim)
    with Load(cluster.url, queries, f"kill-{victim}", texts, offset) as load:
        time.sleep(3.0)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        fresh = lambda: set(replica_actors(victim)) - set(before) and running(victim) == len(before)  # noqa: E731
        recovered_s = wait_for(fresh, 300)
        time.sleep(5.0)  # the new replica serves under load
    # Every answer 200 or 503 with Retry-After, never a 500: requests in flight inside a killed ingress
    # replica are sent again by the proxy's middleware (streamrank.service.ray_proxy).
    assert all(code in (200, 503) for _, _, code in load.codes), load.summary()
    first_search = load.first_ok_after(killed_at, "search")
    first_write = load.first_ok_after(killed_at, "write")
    check_acked(cluster.url, load.acked)
    assert_same_rankings(cluster.url, cluster.sharded, corpus, minilm, queries[:4])
    summary_line(
        f"kill {victim}: replaced in {recovered_s:.1f} s; searches ok again after {first_search} s, writes after "
        f"{first_write} s; {len(load.acked)} acknowledged writes all found; {load.resent} requests in flight on "
        f"a dead replica sent again by the proxy; {load.summary()}"
    )


def test_node_removed_under_load_and_replaced(
    cluster: SimpleNamespace, corpus: SimpleNamespace, docs: list[Document], minilm: Any, summary_line: Any
) -> None:
    queries = [docs[i].title for i in range(0, 200, 25)]
    with Load(cluster.url, queries, "node", [d.text[:300] for d in docs], 150) as load:
        time.sleep(3.0)
        removed_at = time.monotonic()
        cluster.head.remove_node(cluster.workers[1])
        time.sleep(15.0)  # one replica of each shard is left on the other worker node
        degraded = [running(f"shard-dense-s2-{s}") for s in range(SHARDS)]
        added_at = time.monotonic()
        cluster.workers[1] = cluster.head.add_node(num_cpus=1, resources={"shard_host": 2})
        recovered_s = wait_for(lambda: all(running(f"shard-dense-s2-{s}") == 2 for s in range(SHARDS)), 300)
        time.sleep(3.0)
    assert all(code in (200, 503) for t, _, code in load.codes if t >= removed_at), load.summary()
    check_acked(cluster.url, load.acked)
    assert_same_rankings(cluster.url, cluster.sharded, corpus, minilm, queries[:4])
    for shard in range(SHARDS):
        assert len(shard_nodes(shard)) == 2
    summary_line(
        f"node removed: shard replicas running meanwhile {degraded}; searches ok again after "
        f"{load.first_ok_after(removed_at, 'search')} s; a new node added, both shards back to 2 replicas in "
        f"{recovered_s:.1f} s (after {added_at - removed_at:.0f} s down); {len(load.acked)} acknowledged writes "
        f"all found; {load.summary()}"
    )
