"""E2Rank on a decoder embedder against a faithful copy of E2Rank's own evaluation code
(Alibaba-NLP/E2Rank src/eval.py, EvalModel.__call__ with rank_method "listwise"), whose vLLM
``LLM.embed`` with ``PoolerConfig(pooling_type="LAST", normalize=True)`` is stood in for by the same
pooling done one text at a time (no padding) on the same tiny random Qwen3."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tiny_models  # noqa: E402

from streamrank.config import build_stage  # noqa: E402
from streamrank.context import PipelineContext  # noqa: E402
from streamrank.rankers.decoder_embedder import DecoderEmbedder  # noqa: E402
from streamrank.types import Candidate, Document, Query, Ranking  # noqa: E402

QUERY = "how long do fleas live"
WORDS = "adult fleas live months host market fell monday paris capital france bananas yellow".split()
TEXTS = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(5 + (i * 7) % 30)) for i in range(25)]
TEXTS[3] = " ".join(["fleas"] * 1100)  # over E2Rank's 1,024-word cut


class VllmLastPooling:
    """What E2Rank's ``self.model`` (a vLLM LLM in task "embed", LAST pooling, normalize) returns."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def get_tokenizer(self):
        return self.tokenizer

    def embed(self, texts, use_tqdm=False):
        texts = [texts] if isinstance(texts, str) else texts
        outputs = []
        for text in texts:
            ids = torch.tensor([self.tokenizer.encode(text)])
            with torch.no_grad():
                hidden = self.model(input_ids=ids).last_hidden_state[0, -1]
            vector = torch.nn.functional.normalize(hidden.float(), p=2, dim=0).tolist()
            outputs.append(type("Out", (), {"outputs": type("Emb", (), {"embedding": vector})()})())
        return outputs


# ---- E2Rank src/eval.py, EvalModel (rank_method "listwise"), copied faithfully -----------------------------
class EvalModel:
    listwise_prompt_template = "Given a web search query and some relevant documents, rerank the documents that answer the query:\nDocuments:\n{documents}\nSearch Query: {query}"

    def __init__(self, model, rank_method: str = "listwise", num_input_docs: int = 20):
        self.model = model
        self.tokenizer = self.model.get_tokenizer()
        self.rank_method = rank_method
        self.num_input_docs = num_input_docs

    def __call__(self, query: str, docs: list[str]) -> list[int]:
        doc_max_len = 1024
        docs = [" ".join(x.split()[:doc_max_len]) for x in docs]
        input_docs = docs[: self.num_input_docs]
        text = self.listwise_prompt_template.format(
            query=query,
            documents="\n".join([f"[{i}] {doc}" for i, doc in enumerate(input_docs, start=1)]),
        )
        docs = [doc + "<|endoftext|>" for doc in docs]
        outputs = self.model.embed(docs, use_tqdm=False)
        d_reps = []
        for output in outputs:
            d_reps.append(output.outputs.embedding)
        d_reps = torch.tensor(d_reps, dtype=torch.float32)
        messages = [{"role": "user", "content": text}]
        query = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        q_reps = self.model.embed(query, use_tqdm=False)[0].outputs.embedding
        q_reps = torch.tensor(q_reps, dtype=torch.float32).unsqueeze(0)
        scores = (q_reps @ d_reps.T).flatten()
        self.last = (query, docs, scores)
        return scores.argsort(descending=True).tolist()


def test_decoder_e2rank_equals_the_reference_code() -> None:
    from transformers import Qwen3Model

    tokenizer = tiny_models.tokenizer(padding_side="left")
    torch.manual_seed(0)
    model = Qwen3Model(tiny_models.qwen3_config(len(tokenizer))).eval()
    embedder = DecoderEmbedder(model, tokenizer, "tiny-qwen3")
    context = PipelineContext(None, device="cpu")
    stage = build_stage(
        {"kind": "e2rank_decoder", "model": "tiny", "depth": 25, "batch_size": 4}, context, "e2"
    )
    context.shared(("decoder-embedder", "tiny", "float32", 8192, "cpu"), lambda: embedder)

    reference = EvalModel(VllmLastPooling(model, tokenizer))
    order = reference(QUERY, TEXTS)
    ref_query, ref_docs, ref_scores = reference.last
    prompt, docs = stage.texts(QUERY, TEXTS)
    assert prompt == ref_query and docs == ref_docs  # same texts, so the same ids
    assert len(docs[3].split()) == 1024 and "[20] " in prompt and "[21] " not in prompt

    candidates = [
        Candidate(doc_id=f"d{i}", score=-i, rank=i + 1, document=Document(id=f"d{i}", text=t))
        for i, t in enumerate(TEXTS)
    ]
    ranked = stage.run([Ranking(query=Query(id="q", text=QUERY), candidates=candidates)])[0]
    by_doc = {c.doc_id: c.score for c in ranked.candidates}
    ours = torch.tensor([by_doc[f"d{i}"] for i in range(len(TEXTS))])
    assert torch.allclose(ours, ref_scores, atol=1e-5)  # batched left-padded pooling = one-by-one pooling
    assert ranked.doc_ids() == [f"d{i}" for i in order]


def test_last_token_pooling_ignores_left_padding() -> None:
    from transformers import Qwen3Model

    tokenizer = tiny_models.tokenizer()
    torch.manual_seed(1)
    embedder = DecoderEmbedder(Qwen3Model(tiny_models.qwen3_config(len(tokenizer))).eval(), tokenizer, "t")
    texts = ["short", "a somewhat longer text with many more tokens in it"]
    together = embedder.embed(texts, batch_size=2)
    alone = torch.cat([embedder.embed([t], batch_size=1) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(2), atol=1e-5)
