"""Test helpers: tiny random models built in-process, an in-process tokenizer, a test-only memory kind.

Nothing here downloads anything. Sizes are odd on purpose (hidden 32, intermediate 37) so that shape
mix-ups fail instead of broadcasting.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from nativemem import LanguageModel
from nativemem.hooks import hooks, output_hidden, replace_output_hidden
from nativemem.memories.base import Injection, Memory, MemoryConfig, Receipt, register_memory

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Marie Curie was born in Warsaw in 1867 and won two Nobel prizes.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Question: what is the answer? Answer: the answer is forty two.",
    "Context passages are numbered. Reply with a short answer only.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=331, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a few sentences (encodes any text)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  bos_token="<s>", eos_token="<|im_end|>", pad_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str = "llama", vocab_size: int = 331, max_context: int = 512, **overrides):
    """A tiny config of the given architecture (2 layers, hidden 32, intermediate 37)."""
    import transformers

    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=max_context,
                  bos_token_id=0, eos_token_id=3, pad_token_id=1, tie_word_embeddings=False)
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "gemma3_text": "Gemma3TextConfig"}[arch]
    if arch in ("qwen3", "gemma3_text"):
        common["head_dim"] = 8
    if arch == "gemma3_text":
        common["sliding_window"] = 64
    return getattr(transformers, cls)(**{**common, **overrides})


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.to(dtype).eval()


def tiny_lm(arch: str = "llama", seed: int = 0, name: str | None = None, **overrides) -> LanguageModel:
    """A tiny random model of ``arch`` wrapped as a LanguageModel with the in-process tokenizer."""
    tok = tiny_tokenizer()
    model = tiny_model(arch, seed=seed, vocab_size=len(tok), **overrides)
    return LanguageModel(model, tok, name=name or f"tiny-{arch}")


def save_tiny_lm(path, arch: str = "llama", **overrides):
    """Save a tiny random model and its tokenizer to ``path`` (loadable with ``--model path``); returns path."""
    lm = tiny_lm(arch, **overrides)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------- a test-only memory kind
@dataclass
class SteerConfig(MemoryConfig):
    layer: int = 0
    scale: float = 1.0


@register_memory(replace=True)
class SteerMemory(Memory):
    """Adds ``scale`` × the mean residual of the added texts to one layer's output (tests only).

    Small, but it uses every part of the contract: hooks through ``active()``, tensors in state, ids.
    """

    kind = "steer_test"
    config_cls = SteerConfig
    param_prefix = "steer_"

    def __init__(self, lm, config=None, *, path=None):
        super().__init__(lm, config, path=path)
        self.vector = torch.zeros(lm.fingerprint.hidden_size, device=lm.device, dtype=lm.dtype)
        self.ids: list[str] = []

    def add(self, texts, *, user_id=None, metadata=None) -> Receipt:
        texts = self._texts(texts)
        captured = []

        def grab(module, args, kwargs, output):
            captured.append(output_hidden(output).detach().mean(dim=(0, 1)))

        tokens = 0
        with torch.inference_mode(), hooks(self.lm.model, [("residual_post", self.config.layer, grab)]):
            for t in texts:
                ids = self.lm.encode(t)
                tokens += ids.shape[1]
                self.lm.model(input_ids=ids)
        self.vector = torch.stack(captured).mean(0).clone()
        new = [f"steer-{len(self.ids) + i}" for i in range(len(texts))]
        self.ids += new
        return Receipt(self.kind, "add", ids=new, tokens=tokens, layers=[self.config.layer])

    def delete(self, memory_id: str) -> Receipt:
        if memory_id not in self.ids:
            return Receipt(self.kind, "delete", notes=[f"no item {memory_id!r}"])
        self.ids.remove(memory_id)
        return Receipt(self.kind, "delete", ids=[memory_id])

    @contextmanager
    def _activate(self, *, user_id, query) -> Iterator[Injection]:
        vec = self.vector * self.config.scale

        def add_vec(module, args, kwargs, output):
            return replace_output_hidden(output, output_hidden(output) + vec)

        with hooks(self.lm.model, [("residual_post", self.config.layer, add_vec)]):
            yield Injection()

    def state_dict(self):
        return {"steer_vector": self.vector}

    def load_state_dict(self, state):
        self.vector = state["steer_vector"]

    def extra_state(self):
        return {"ids": self.ids}

    def load_extra_state(self, state):
        self.ids = list(state.get("ids", []))

    def stats(self):
        return {**super().stats(), "items": len(self.ids)}

