"""Selection methods: one registry entry per method, and nothing about methods elsewhere.

An entry says how the selection score is computed from a batch of score rows (`score_fn`),
which columns that needs, what scoring must produce for it (a second CLIP model, OCR text),
its defaults and the note the summary carries. The CLI's choices, the job's checks and the
summary all come from here, so a new method is one `register(Method(...))`.

Methods whose `rule_threshold` is set keep by their own rule: the score is 1.0 (keep) or 0.0
(drop), selected with score >= rule_threshold; fraction/threshold do not apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

# (record batch with `columns`, method options such as text_match_threshold) -> float32 score
# per row, NaN where it is missing (counted as non-finite, never a candidate)
ScoreFn = Callable[[pa.RecordBatch, Mapping[str, Any]], np.ndarray]


@dataclass(frozen=True)
class Method:
    name: str
    columns: tuple[str, ...]  # score-table columns the score needs
    score_fn: ScoreFn
    score: str  # how the selection score is formed (recorded in the summary)
    default_fraction: float | None = None
    default_threshold: float | None = None
    rule_threshold: float | None = None  # keeps by its own 0/1 rule (see module doc)
    needs_second_model: bool = False  # scoring must run --clip-model-2
    needs_ocr: bool = False  # scoring must run text recognition (ocr_text)
    options: tuple[str, ...] = ()  # Config fields the score function reads
    note: str | None = None

    def missing_hint(self) -> str:
        """What to score with when the score table lacks this method's columns."""
        if self.needs_second_model:
            return " (score with --clip-model-2 to get clip_score_2)"
        if self.needs_ocr:
            return f" ({self.name} needs ocr_text and caption: score with --recognize-text)"
        return ""

    def scoring_needs(self, cfg: Any) -> tuple[dict[str, Any], list[str]]:
        """(Config overrides scoring needs for this method, problems that make it impossible).
        `cfg` is anything with the Config fields clip_model_2 and recognize_text."""
        overrides: dict[str, Any] = {}
        problems: list[str] = []
        if self.needs_ocr and not getattr(cfg, "recognize_text", False):
            overrides["recognize_text"] = True
        if self.needs_second_model and not getattr(cfg, "clip_model_2", None):
            problems.append(
                f"--method {self.name} needs a second model: --clip-model-2 / --clip-pretrained-2"
            )
        if "clip_score" in self.columns and getattr(cfg, "score_original", True) is False:
            problems.append(
                f"--method {self.name} selects on clip_score, which --no-score-original does "
                "not compute"
            )
        return overrides, problems


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"selection method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


@contextmanager
def registered(method: Method) -> Iterator[Method]:
    """A temporary registry entry (tests, experiments)."""
    register(method)
    try:
        yield method
    finally:
        METHODS.pop(method.name, None)


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}") from None


class _Names(Sequence):
    """The registered method names, live: Config's `method` choices follow the registry."""

    def __getitem__(self, i: Any) -> Any:
        return list(METHODS)[i]

    def __len__(self) -> int:
        return len(METHODS)

    def __contains__(self, name: object) -> bool:
        return name in METHODS

    def __repr__(self) -> str:
        return repr(list(METHODS))


NAMES: Sequence[str] = _Names()


# ------------------------------------------------------------------ arrow -> numpy helpers
# Through the buffers: pyarrow's own conversions and compute calls import pandas on first use
# (~1 s of CPU per process) and we need neither.
def valid_mask(arr: pa.Array) -> np.ndarray | None:
    """Validity per row, or None when the array has no nulls."""
    if not arr.null_count:
        return None
    bits = np.frombuffer(arr.buffers()[0], np.uint8)
    return np.unpackbits(bits, bitorder="little")[arr.offset : arr.offset + len(arr)].astype(bool)


def float32(arr: pa.Array) -> np.ndarray:
    """A float column as float32 with NaN for nulls."""
    if arr.type != pa.float32():
        arr = arr.cast(pa.float32())
    values = np.frombuffer(arr.buffers()[1], np.float32, count=len(arr), offset=arr.offset * 4)
    valid = valid_mask(arr)
    return values if valid is None else np.where(valid, values, np.float32(np.nan))


def column_score(name: str) -> ScoreFn:
    """The score is one float column."""

    def fn(batch: pa.RecordBatch, _opts: Mapping[str, Any]) -> np.ndarray:
        return float32(batch.column(name))

    return fn


def second_minus_first(batch: pa.RecordBatch, _opts: Mapping[str, Any]) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # inf - inf = NaN: counted as non-finite
        return float32(batch.column("clip_score_2")) - float32(batch.column("clip_score"))


# ------------------------------------------------------------------------------ text-match
_WORD = re.compile(r"[^\W_]+")  # runs of Unicode letters and digits


def words(text: str | None) -> list[str]:
    """Normalised words: lower-cased maximal runs of letters/digits (punctuation, spaces and
    underscores separate words)."""
    return _WORD.findall(text.lower()) if text else []


def text_match_overlap(ocr_text: str | None, caption: str | None) -> float | None:
    """Share of the OCR words (normalised by `words`, only those of >= 2 characters, counted
    with repetition) that also occur among the caption's normalised words; None when the
    sample has no such OCR word."""
    ocr = [w for w in words(ocr_text) if len(w) >= 2]
    if not ocr:
        return None
    cap = set(words(caption))
    return sum(w in cap for w in ocr) / len(ocr)


def text_match_keep(ocr_text: str | None, caption: str | None, threshold: float) -> bool:
    """The text-match rule: keep unless `text_match_overlap >= threshold`. Samples without OCR
    text (null, empty, or only 1-character words) are kept."""
    share = text_match_overlap(ocr_text, caption)
    return share is None or share < threshold


def text_match_score(batch: pa.RecordBatch, opts: Mapping[str, Any]) -> np.ndarray:
    threshold = float(opts.get("text_match_threshold", 0.5))
    ocr = batch.column("ocr_text").to_pylist()
    cap = batch.column("caption").to_pylist()
    return np.fromiter(
        (1.0 if text_match_keep(o, c, threshold) else 0.0 for o, c in zip(ocr, cap)),
        np.float32,
        len(ocr),
    )


# ------------------------------------------------------------------- the paper's methods
register(Method("tmars", ("tmars_score",), column_score("tmars_score"), "tmars_score", 0.5))
register(Method("clip-score", ("clip_score",), column_score("clip_score"), "clip_score", 0.5))
register(
    Method(
        "laion",
        ("clip_score",),
        column_score("clip_score"),
        "clip_score",
        default_threshold=0.281,
        note="LAION-400M's rule (clip_score >= 0.281) is meaningful only with OpenAI "
        "ViT-B/32 scores (--clip-model ViT-B-32 --clip-pretrained openai).",
    )
)
# C-SSFT: model 1 (--clip-model) is the pool-trained/pretrained checkpoint, model 2
# (--clip-model-2) the same after fine-tuning on a second, clean split. Samples whose
# similarity drops (forgotten) are mislabeled: keep the high clip_score_2 - clip_score.
register(
    Method(
        "c-ssft",
        ("clip_score", "clip_score_2"),
        second_minus_first,
        "clip_score_2 - clip_score",
        default_fraction=0.5,
        needs_second_model=True,
        note="c-ssft: score = clip_score_2 - clip_score; --clip-model is the checkpoint "
        "before second-split fine-tuning, --clip-model-2 the one after it; the least "
        "forgotten samples are kept.",
    )
)
# C-RHO (RHO-LOSS): reducible holdout loss = loss(pool-trained model) - loss(model trained on
# clean holdout data). With loss = -cosine similarity this is clip_score_2 - clip_score.
register(
    Method(
        "c-rho",
        ("clip_score", "clip_score_2"),
        second_minus_first,
        "clip_score_2 - clip_score",
        default_fraction=0.5,
        needs_second_model=True,
        note="c-rho: score = clip_score_2 - clip_score (reducible holdout loss with "
        "loss = -cosine); --clip-model is trained on the pool, --clip-model-2 on a clean "
        "holdout set; high reducible loss is kept.",
    )
)
register(
    Method(
        "text-match",
        ("ocr_text", "caption"),
        text_match_score,
        "1 if kept by text_match_keep else 0",
        rule_threshold=1.0,
        needs_ocr=True,
        options=("text_match_threshold",),
        note="text-match: drops a sample when the share of its OCR words (>= 2 characters) "
        "found among its caption's words is >= text_match_threshold; samples without OCR "
        "text are kept.",
    )
)
