"""Configuration of the activation memory (KV payload + retrieval by the model's own states).

Defaults follow Neural Native Memory (github.com/tobiasbrummer/neural-native-memory): the payload is the full
per-layer KV of each chunk with keys stored before rotary encoding (the only injection that system evaluated);
retrieval uses a KV-Embedding pooled vector (arXiv 2601.01046), token-level MaxSim, or either fused with BM25.
Layer choice and the retrieval transform are fitted by :meth:`ActivationMemory.fit` on a fit set that is not
the evaluated corpus and recorded in ``fit_report``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import InputError
from ..base import MemoryConfig

__all__ = ["ActivationConfig", "PAYLOADS", "KV_DTYPES", "VARIANTS", "BACKENDS"]

PAYLOADS = ("kv", "residual", "none")
KV_DTYPES = ("float16", "bfloat16", "float32", "int8", "int4")
WHITEN = ("auto", "always", "never")
VARIANTS = ("pooled", "tokens", "hybrid", "hybrid_tokens", "bm25")
BACKENDS = ("edge", "qdrant", "redis")
ORDERS = ("best_first", "best_last")
FRAMES = ("chat", "raw")
DEFAULT_GATE_THRESHOLD = 0.7


@dataclass
class ActivationConfig(MemoryConfig):
    """Activation memory: what is stored per chunk, how it is retrieved and how it is injected.

    Bytes per token of the payload, for L layers, H KV heads of width Dh and hidden size D (token ids and
    record headers aside; per-channel key scales cost 4·L·H·Dh bytes per chunk, spread over its tokens):
    ``kv`` fp16 = 4·L·H·Dh; ``kv`` int8 = 2·L·H·Dh + 2·L·H; ``kv`` int4 = L·H·Dh + 2·L·H;
    ``residual`` at layer c = 4·c·H·Dh + 2·D.
    """

    # ---- write
    chunk_tokens: int = field(default=256, metadata={
        "help": "token budget of one chunk (sentence-aware split; the template is not counted)"})
    frame: str = field(default="chat", metadata={
        "help": "what each chunk is written after, and where its KV is injected. chat: the chat template's system "
                "turn (frame_system) and the opening of the user turn, so a chunk sits inside the user message "
                "before the question, as a RAG prompt puts a passage (falls back to raw for a model without a chat "
                "template); raw: BOS only, the chunks placed before the whole chat prompt"})
    frame_system: str | None = field(default=None, metadata={
        "help": "frame=chat: the system prompt the chunks are written under; None = the library's default system "
                "prompt. A prompt with another system prompt still gets the chunks, placed before it"})
    chunk_prefix: str = field(default="Context:", metadata={
        "help": "text placed before each chunk's content (its own tokens; excluded from token vectors)"})
    chunk_suffix: str = field(default="\n\n", metadata={"help": "text placed after each chunk's content"})
    query_prefix: str = field(default="Query:", metadata={
        "help": "role text before a query when encoding it for retrieval (KV-Embedding uses role names)"})
    compress_prompt: str = field(default="Compress the context in one word:", metadata={
        "help": "KV-Embedding compression prompt appended after the chunk (or query) for the pooled vector"})
    batch_size: int = field(default=8, metadata={"help": "chunks per forward pass while writing"})
    # ---- payload
    payload: str = field(default="kv", metadata={
        "help": "kv: every layer's KV (pre-RoPE keys); residual: KV of layers < checkpoint_layer plus the "
                "residual stream entering checkpoint_layer, from which the other layers' KV are recomputed "
                "at injection (smaller, slower); none: retrieval only (no payload, nothing is injected)"})
    kv_dtype: str = field(default="int8", metadata={
        "help": "precision of the stored KV: float16 | bfloat16 | float32 | int8 | int4. int8/int4 quantise "
                "KIVI-style: keys per channel over the chunk (asymmetric), values per token (symmetric), fp16 "
                "scales. Default int8: about half of fp16's bytes; int4 (about a quarter) changed more answers "
                "of the default model (docs/benchmarks.md)"})
    checkpoint_layer: int | None = field(default=None, metadata={
        "help": "layer whose input residual is stored when payload='residual'; None = one third of the depth"})
    key_group: int = field(default=0, metadata={
        "help": "int8/int4: at most this many tokens share one key scale per channel (KIVI groups; finer scales, "
                "4 more bytes per channel and group); 0 = one per channel over the whole chunk"})
    device_cache_bytes: int | None = field(default=None, metadata={
        "help": "byte budget of the device tier (chunks' stored KV kept in GPU memory, least recently used out); "
                "None = 1 GiB on a CUDA device, 0 elsewhere"})
    host_cache_bytes: int = field(default=2 << 30, metadata={
        "help": "byte budget of the host-RAM tier (pinned memory when the model is on a GPU)"})
    recompute_tokens: int = field(default=0, metadata={
        "help": "with several chunks injected: recompute the KV of the first N tokens of every chunk after the "
                "first, attending to the chunks before it (CacheBlend-style boundary repair; costs one forward "
                "of N tokens per chunk). 0 = off"})
    # ---- retrieval
    variant: str = field(default="hybrid_tokens", metadata={
        "help": "default retrieval: pooled (KV-Embedding vector) | tokens (MaxSim over content tokens) | "
                "hybrid (pooled + BM25, RRF) | hybrid_tokens (tokens + BM25, RRF) | bm25 (reference). Default: "
                "the best variant measured on SQuAD with SmolLM2 (README: Figures)"})
    index_pooled: bool | None = field(default=None, metadata={
        "help": "store the pooled KV-Embedding vector of every chunk (a second forward pass per chunk); None = only "
                "when the default variant needs it (pooled, hybrid). Without it, writes take one pass and the "
                "pooled and hybrid variants are unavailable"})
    top_k: int = field(default=2, metadata={
        "help": "most chunks injected per generation call (the relevance gate may inject fewer)"})
    max_prefix_tokens: int = field(default=2048, metadata={"help": "cap on injected prefix tokens"})
    prefix_order: str = field(default="best_first", metadata={
        "help": "order of injected chunks: best_first (as RAG prompts list them) | best_last (nearest the question)"})
    retrieval_layer: int | None = field(default=None, metadata={
        "help": "layer whose output gives the retrieval vectors; None = chosen by fit() (before fit: 2/3 depth)"})
    reroute_layers: tuple[int, ...] | None = field(default=None, metadata={
        "help": "layers whose last-token KV is re-routed as a one-slot prefix (KV-Embedding); None = TwoNN "
                "choice of fit() (before fit: the retrieval layer)"})
    reroute_bias: float = field(default=1.0, metadata={
        "help": "attention-logit bias on the re-routed slot (paper Sec 3.2.2: b = 1.0)"})
    pooled_dim: int | None = field(default=None, metadata={
        "help": "dimensions kept by PCA whitening of pooled vectors; None = hidden size"})
    token_dim: int | None = field(default=128, metadata={
        "help": "dimensions kept by PCA whitening of token vectors (ColBERT-sized); None = hidden size"})
    whiten: str = field(default="auto", metadata={
        "help": "auto: fit() probes centring vs z-score + whitening per retrieval variant on held-out pairs and "
                "keeps the better (both scores are in fit_report); always | never"})
    zscore: bool = field(default=True, metadata={"help": "z-score each dimension before whitening"})
    shrinkage: float = field(default=0.1, metadata={
        "help": "covariance shrinkage toward a scaled identity (fit sets are often smaller than the width)"})
    rrf_k: int = field(default=60, metadata={"help": "k of reciprocal-rank fusion in the hybrid variants"})
    bm25_weight: float = field(default=1.0, metadata={
        "help": "weight of the BM25 ranking in the reciprocal-rank fusion of the hybrid variants (the model-state "
                "ranking weighs 1)"})
    candidates: int = field(default=50, metadata={"help": "per-ranker candidates fused by the hybrid variants"})
    # ---- store
    backend: str = field(default="edge", metadata={
        "help": "edge: embedded Qdrant Edge shard in the memory folder; qdrant: qdrant-client (server, or "
                "its local mode) with the same schema; redis: the index's changes go to a Redis stream and every "
                "process (server replica) keeps its own Qdrant Edge replica of it (needs redis_url)"})
    qdrant_location: str = field(default="", metadata={
        "help": "backend=qdrant: a URL (http://host:6333; API key from $QDRANT_API_KEY), ':memory:', or a "
                "folder for qdrant-client's local mode"})
    collection: str | None = field(default=None, metadata={
        "help": "backend=qdrant: collection name; None = nativemem_activation_<fingerprint>_<transform>"})
    redis_url: str = field(default="", metadata={
        "help": "redis://[:password@]host:port/db (or rediss://, unix://): the KV payloads and the catalog live in "
                "this Redis, shared by every replica that opens a memory of the same model and transform; with "
                "backend=redis the index's change log too. Run Redis with appendonly yes / appendfsync always"})
    blob_dir: str | None = field(default=None, metadata={
        "help": "folder of payload blobs; None = <memory>/blobs (shared storage for a cluster)"})
    min_free_bytes: int = field(default=256 * 2**20, metadata={
        "help": "a write is refused (before anything is written) when it would leave less than this free on the "
                "memory's disk"})
    # ---- relevance gate
    gate_threshold: float = field(default=DEFAULT_GATE_THRESHOLD, metadata={
        "help": "chat and generation inject a retrieved chunk only when its calibrated relevance (probability that "
                "it helps answer the query) is at least this, so 0 to top_k chunks are injected; 0 injects every "
                "top_k hit. Default 0.7: at 0.5 a tenth of unanswerable questions still got a chunk; 0.7 kept 99 % of "
                "them unchanged on another split of SQuAD/MMLU (docs/benchmarks.md)"})
    # ---- set by fit()
    fit_report: dict[str, Any] | None = field(default=None, metadata={
        "help": "written by fit(): the TwoNN ID curve, chosen layers, probe scores, fit-set size"})
    relevance: dict[str, Any] | None = field(default=None, metadata={
        "help": "written by fit() / fit_relevance(): the relevance calibrator (standardisation, logistic "
                "coefficients) and its held-out calibration error"})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActivationConfig:
        if "frame" not in d:  # memories written before frames existed put chunks after BOS alone
            d = {**d, "frame": "raw"}
        return super().from_dict(d)

    def __post_init__(self) -> None:
        if self.reroute_layers is not None:
            self.reroute_layers = tuple(int(i) for i in self.reroute_layers)
        for name in ("chunk_tokens", "batch_size", "top_k", "max_prefix_tokens", "rrf_k", "candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        for name, value, allowed in (("payload", self.payload, PAYLOADS), ("kv_dtype", self.kv_dtype, KV_DTYPES),
                                     ("variant", self.variant, VARIANTS), ("backend", self.backend, BACKENDS),
                                     ("prefix_order", self.prefix_order, ORDERS), ("whiten", self.whiten, WHITEN),
                                     ("frame", self.frame, FRAMES)):
            if value not in allowed:
                raise InputError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        for name in ("host_cache_bytes", "recompute_tokens", "device_cache_bytes", "key_group", "min_free_bytes"):
            value = getattr(self, name)
            if value is None and name == "device_cache_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("pooled_dim", "token_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer or None, got {value!r}")
        if isinstance(self.bm25_weight, bool) or not isinstance(self.bm25_weight, (int, float)) \
                or not 0.0 <= self.bm25_weight <= 100.0:
            raise InputError(f"bm25_weight must be a number in [0, 100], got {self.bm25_weight!r}")
        self.bm25_weight = float(self.bm25_weight)
        if not 0.0 <= self.shrinkage < 1.0:
            raise InputError(f"shrinkage must be in [0, 1), got {self.shrinkage}")
        if isinstance(self.gate_threshold, bool) or not isinstance(self.gate_threshold, (int, float)) \
                or not 0.0 <= self.gate_threshold <= 1.0:
            raise InputError(f"gate_threshold must be a number in [0, 1] (a probability), got {self.gate_threshold!r}")
        self.gate_threshold = float(self.gate_threshold)
        if not isinstance(self.redis_url, str) or (
                self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://"))):
            raise InputError(f"redis_url must be a redis://, rediss:// or unix:// URL, got {self.redis_url!r}")
        if self.backend == "redis" and not self.redis_url:
            raise InputError("backend='redis' needs redis_url (redis://host:port/db)")
        if self.redis_url and self.backend == "edge":
            raise InputError("redis_url needs backend='redis' or 'qdrant' (an index every replica shares); the "
                             "edge index lives in one folder")
        if self.backend == "qdrant" and not self.qdrant_location:
            raise InputError("backend='qdrant' needs qdrant_location (a URL, ':memory:' or a folder)")
