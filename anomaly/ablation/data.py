"""Token streams for the ablation: real text and code, split by file, plus passkey prompts.

Tokenizer: the real SmolLM2 BPE (loaded from the bundled GGUF, no hub), with its 49,152
entries *trimmed* to the ``vocab_size`` most frequent tokens of the training split, plus
``<unk>`` (id 0) and ``<eos>`` (id 1). Why not bytes: a BPE token carries ~3 characters, so
a 128-token window holds a passkey sentence, filler and the question as in the paper, and
lengths are counted in the paper's unit. Why trimmed: with the full vocabulary a model of
hidden size 128 would spend ~90% of its parameters and much of its compute on the
embedding and the output layer. Tokens outside the kept set become ``<unk>``; their share
is reported (``unk_rate``), and every token of the passkey task is always kept.

Tokenised documents are cached under the run's output directory
(``cache/tokens.safetensors``, SmolLM2 ids), so resuming or re-evaluating a run does not
tokenise again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import Tensor

from anomaly.ablation.config import AblationConfig
from anomaly.ablation.passkey import PasskeyTask
from anomaly.corpus import Document, shakespeare_plays, split_by_file, stdlib_sources
from anomaly.io import atomic_path
from anomaly import models

UNK, EOS = 0, 1
"""Ids of ``<unk>`` and ``<eos>`` in every trimmed vocabulary."""


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """The bundled SmolLM2 tokenizer (only the tokenizer is read from the GGUF, ~15 s)."""
    tok = models.load_tokenizer(models.BUNDLED)
    tok.model_max_length = 1 << 30  # whole documents are tokenised; we cut windows ourselves
    return tok


class TokenCache:
    """SmolLM2 token ids of whole documents, cached in one safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids: dict[str, np.ndarray] = load_file(str(path)) if path.exists() else {}
        self._dirty = False

    def get(self, doc: Document) -> np.ndarray:
        """``int32[tokens]`` of ``doc`` (tokenising it on a miss)."""
        if doc.name not in self._ids:
            ids = load_tokenizer()(doc.read(), add_special_tokens=False)["input_ids"]
            self._ids[doc.name] = np.asarray(ids, dtype=np.int32)
            self._dirty = True
        return self._ids[doc.name]

    def save(self) -> None:
        if self._dirty:
            with atomic_path(self.path) as tmp:
                save_file(self._ids, str(tmp))
            self._dirty = False


@dataclass(frozen=True)
class Vocab:
    """A trimmed vocabulary: our id ``i`` is SmolLM2 id ``hf_ids[i]`` (``i >= 2``)."""

    hf_ids: tuple[int, ...]
    """SmolLM2 id of each of our ids; entries 0 and 1 (``<unk>``, ``<eos>``) are -1."""

    @functools.cached_property
    def _lookup(self) -> np.ndarray:
        table = np.full(max(self.hf_ids) + 1, UNK, dtype=np.int64)
        ids = np.asarray(self.hf_ids[2:], dtype=np.int64)
        table[ids] = np.arange(2, len(self.hf_ids))
        return table

    def __len__(self) -> int:
        return len(self.hf_ids)

    def from_hf(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Map SmolLM2 ids to ours (unknown ones to ``<unk>``)."""
        ids = np.asarray(ids, dtype=np.int64)
        table = self._lookup
        inside = ids < len(table)
        return np.where(inside, table[np.minimum(ids, len(table) - 1)], UNK)

    def encode(self, text: str) -> list[int]:
        """Tokenise ``text`` with SmolLM2 and map to our ids."""
        return self.from_hf(load_tokenizer()(text, add_special_tokens=False)["input_ids"]).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of our ids (``<unk>``/``<eos>`` dropped)."""
        hf = [self.hf_ids[i] for i in ids if i >= 2]
        return load_tokenizer().decode(hf)


def build_vocab(counts: np.ndarray, size: int, required: Sequence[int]) -> Vocab:
    """Keep the ``size - 2`` most frequent SmolLM2 ids, always including ``required``.

    Ties are broken by id so the result is deterministic.
    """
    required = sorted(set(int(i) for i in required))
    if len(required) > size - 2:
        raise ValueError(f"vocab_size {size} cannot hold the {len(required)} required tokens")
    order = np.lexsort((np.arange(len(counts)), -counts))  # by count desc, then id
    keep = list(required)
    chosen = set(required)
    for i in order:
        if len(keep) >= size - 2:
            break
        if counts[i] > 0 and int(i) not in chosen:
            keep.append(int(i))
            chosen.add(int(i))
    return Vocab(hf_ids=(-1, -1, *sorted(keep)))


@dataclass
class AblationData:
    """Everything the ablation trains and evaluates on, for every seed.

    The text/code stream and the vocabulary depend on ``data_seed`` only; the *order* of the
    training sequences and the passkey training prompts depend on the run seed
    (:meth:`training_sequences`), so seeds differ in data order, not in data.
    """

    vocab: Vocab
    """The trimmed vocabulary."""
    text_chunks: np.ndarray
    """``int64[n_text, T]`` language-model sequences cut from the training plays."""
    code_chunks: np.ndarray
    """``int64[n_code, T]`` language-model sequences cut from the training code."""
    n_passkey: int
    """Passkey training sequences per run."""
    held_out: dict[str, Tensor]
    """Held-out plays (name -> ``int64[tokens]``), for perplexity and probing."""
    passkey: PasskeyTask
    """The passkey task in this vocabulary."""
    stats: dict = field(default_factory=dict)
    """Documents, token counts, epochs over the training text, ``<unk>`` rates."""

    def training_sequences(self, seed: int) -> tuple[Tensor, list[str]]:
        """The training sequences of seed ``seed`` in training order.

        Returns:
            ``int64[steps · batch_size, T]`` and, per sequence, ``"text"``, ``"code"`` or
            ``"passkey"``. Deterministic in ``(data_seed, seed)``.
        """
        rng = np.random.default_rng([self.stats["data_seed"], seed])
        n_text, n_code, T = len(self.text_chunks), len(self.code_chunks), self.text_chunks.shape[1]
        n_seq = n_text + n_code + self.n_passkey
        text = self.text_chunks[rng.permutation(n_text)]
        code = self.code_chunks[rng.permutation(n_code)]
        kinds = np.array(["text"] * n_text + ["code"] * n_code + ["passkey"] * self.n_passkey)
        kinds = kinds[rng.permutation(n_seq)]
        train = np.empty((n_seq, T), dtype=np.int64)
        train[kinds == "text"] = text
        train[kinds == "code"] = code
        for i in np.flatnonzero(kinds == "passkey"):
            train[i] = self.passkey.sequence(T, rng)
        return torch.from_numpy(train), kinds.tolist()


def _stream(docs: list[Document], cache: TokenCache, need: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], float]:
    """Concatenate documents (shuffled, ``<eos>``-separated, SmolLM2 ids, eos as -1) until
    ``need`` tokens; cycle through the documents again if they run out.

    Returns the stream, the names used, and how many passes over the documents it took.
    """
    order = rng.permutation(len(docs))
    parts, names, total, passes = [], [], 0, 0.0
    i = 0
    while total < need:
        doc = docs[order[i % len(docs)]]
        ids = cache.get(doc)
        parts += [ids, np.array([-1], dtype=np.int32)]
        if i < len(docs):
            names.append(doc.name)
        total += len(ids) + 1
        i += 1
    passes = i / len(docs)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32), names, passes


def build_data(config: AblationConfig, cache_dir: Path) -> AblationData:
    """Tokenise, trim the vocabulary and cut the language-model sequences.

    Deterministic in ``config`` (``data_seed``); :meth:`AblationData.training_sequences`
    lays them out for one seed.
    """
    T = config.data.train_length
    n_seq = config.train.steps * config.train.batch_size
    n_passkey = round(n_seq * config.data.passkey_share)
    n_code = round((n_seq - n_passkey) * config.data.code_share)
    n_text = n_seq - n_passkey - n_code
    rng = np.random.default_rng(config.data_seed)

    plays_train, plays_held = split_by_file(shakespeare_plays(), config.data.held_out_fraction)
    code_train, _ = split_by_file(stdlib_sources(), config.data.held_out_fraction)
    if not plays_held:
        raise ValueError("no held-out play; raise held_out_fraction")
    cache = TokenCache(cache_dir / "tokens.safetensors")
    text, text_names, text_passes = _stream(plays_train, cache, max(n_text, 1) * T, rng)
    code, code_names, code_passes = _stream(code_train, cache, max(n_code, 1) * T, rng)
    held_hf = {d.name: cache.get(d) for d in plays_held}
    cache.save()

    tok = load_tokenizer()
    counts = np.bincount(np.concatenate([text[text >= 0], code[code >= 0]]), minlength=len(tok))
    required = [i for s in PasskeyTask.vocabulary_texts() for i in tok(s, add_special_tokens=False)["input_ids"]]
    vocab = build_vocab(counts, config.model.vocab_size, required)

    def ours(stream: np.ndarray) -> np.ndarray:
        return np.where(stream < 0, EOS, vocab.from_hf(np.maximum(stream, 0)))

    task = PasskeyTask(vocab.encode, vocab.decode)
    # Non-overlapping chunks of T tokens, in stream order (each seed shuffles them).
    text_chunks = ours(text)[: n_text * T].reshape(n_text, T)  # [n_text, T]
    code_chunks = ours(code)[: n_code * T].reshape(n_code, T)  # [n_code, T]
    held = {name: torch.from_numpy(vocab.from_hf(ids)) for name, ids in held_hf.items()}
    lm = np.concatenate([text_chunks.ravel(), code_chunks.ravel()])
    held_all = torch.cat(list(held.values()))
    stats = {
        "data_seed": config.data_seed,
        "train_documents": {"text": text_names, "code": code_names},
        "held_out_documents": sorted(held),
        "passes_over_train_documents": {"text": round(text_passes, 3), "code": round(code_passes, 3)},
        "train_sequences": {"text": n_text, "code": n_code, "passkey": n_passkey},
        "train_tokens": n_seq * T,
        "held_out_tokens": {name: len(ids) for name, ids in held.items()},
        "unk_rate": {
            "train": float(np.mean(lm == UNK)) if lm.size else 0.0,
            "held_out": float((held_all == UNK).float().mean()),
        },
        "tokenizer": f"SmolLM2-135M-Instruct ({models.BUNDLED_GGUF}), trimmed to {len(vocab)} ids",
    }
    return AblationData(vocab=vocab, text_chunks=text_chunks.astype(np.int64), code_chunks=code_chunks.astype(np.int64),
                        n_passkey=n_passkey, held_out=held, passkey=task, stats=stats)
