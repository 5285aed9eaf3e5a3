"""The passkey-retrieval task (docs/conventions.md §6, after Mohtashami & Jaggi 2023).

A fixed filler passage is repeated to reach the target length; one sentence stating a
random 5-digit passkey (10000–99999) is inserted at a random depth; a question asking for
the passkey closes the prompt. A prompt is retrieved when greedy decoding reproduces the
answer exactly (checked by teacher forcing: :func:`anomaly.ablation.evaluate.passkey_scores`).

Prompts are assembled from token ids, not text, so that a prompt has *exactly* the
requested length: ``len(prompt) + len(answer) == length``. The answer therefore fits in
the window being tested, and at 1× the whole exchange fits in the training length.
Mohtashami & Jaggi's preamble ("There is an important info hidden …", ~30 tokens) is left
out: at our training lengths (64–512 tokens) it would crowd out the filler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = " The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {passkey}"

Encode = Callable[[str], list[int]]
Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey sample."""

    prompt: list[int]
    """Token ids of filler + key sentence + filler + question."""
    answer: list[int]
    """Token ids of the answer (``" 12345"``); the training target."""
    passkey: int
    """The 5-digit passkey."""
    depth: float
    """Where the key sentence sits within the filler, 0 (start) … 1 (end)."""
    key_span: tuple[int, int] = (0, 0)
    """``[start, end)`` token positions of the key sentence in ``prompt``."""


class PasskeyTask:
    """Builds passkey prompts of exact token lengths with a given tokenizer."""

    def __init__(self, encode: Encode, decode: Decode) -> None:
        self.encode, self.decode = encode, decode
        self._filler = encode(FILLER)
        period = encode(".")
        if len(period) != 1:
            raise ValueError("the tokenizer must encode '.' as one token")
        # Sentence boundaries of one filler repetition (after each '.'): key sentences go there.
        self._period = period[0]
        self._question = encode(QUESTION)
        # Our ids of the ten digits: the answer's tokens that carry the passkey.
        self._digit_ids = sorted({i for i in encode(" 0123456789") if decode([i]).strip().isdigit()})

    @staticmethod
    def vocabulary_texts() -> list[str]:
        """Texts whose tokens a trimmed vocabulary must keep for the task to be expressible."""
        digits = " ".join(str(i) for i in range(10))
        return [FILLER, KEY_SENTENCE.format(passkey=digits), QUESTION, ANSWER.format(passkey=digits), "."]

    def fixed_tokens(self) -> int:
        """Tokens of a prompt+answer that are not filler (upper bound over passkeys)."""
        return len(self.encode(KEY_SENTENCE.format(passkey=99999))) + len(self._question) + len(
            self.encode(ANSWER.format(passkey=99999))
        )

    def build(self, length: int, passkey: int, depth: float) -> PasskeyPrompt:
        """A prompt whose length plus its answer's is exactly ``length`` tokens."""
        key = self.encode(KEY_SENTENCE.format(passkey=passkey))
        answer = self.encode(ANSWER.format(passkey=passkey))
        n_filler = length - len(key) - len(self._question) - len(answer)
        if n_filler < 0:
            raise ValueError(
                f"a passkey prompt needs at least {length - n_filler} tokens, got length {length}"
            )
        reps = n_filler // len(self._filler) + 1
        filler = (self._filler * reps)[:n_filler]
        # Insert at the sentence boundary nearest the requested depth.
        bounds = [0] + [i + 1 for i, tok in enumerate(filler) if tok == self._period]
        if bounds[-1] != n_filler:
            bounds.append(n_filler)
        at = min(bounds, key=lambda b: abs(b - depth * n_filler))
        prompt = filler[:at] + key + filler[at:] + self._question
        return PasskeyPrompt(prompt=prompt, answer=answer, passkey=passkey, depth=depth, key_span=(at, at + len(key)))

    def sample(self, length: int, rng: np.random.Generator) -> PasskeyPrompt:
        """A prompt with a uniformly random passkey in [10000, 99999] and depth in [0, 1]."""
        passkey = int(rng.integers(10000, 100000))
        depth = float(rng.random())
        return self.build(length, passkey, depth)

    def sequence(self, length: int, rng: np.random.Generator) -> list[int]:
        """A training sequence: prompt followed by its answer, exactly ``length`` tokens."""
        p = self.sample(length, rng)
        return p.prompt + p.answer

    def digit_mask(self, answers: torch.Tensor) -> torch.Tensor:
        """``bool[..., a]``: which answer tokens are digits of the passkey."""
        return torch.isin(answers, torch.tensor(self._digit_ids, device=answers.device))
