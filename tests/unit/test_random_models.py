"""`random:NAME` models: a published shape with random weights, for timing (only random:tiny is built here).

The tokenizer is the default model's, so the first run converts the default GGUF once (~20 s, then cached).
"""

import json

import pytest
import torch
from testing import tiny_lm
from typer.testing import CliRunner

import nativemem as nm
from nativemem.bench import report, run_benchmark
from nativemem.bench.report import RANDOM_WEIGHTS_NOTE
from nativemem.cli.main import app
from nativemem.errors import ModelLoadError
from nativemem.loading import RANDOM_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

# made-up data: two questions, enough for one benchmark run
_SQUAD = {"version": "1.1", "data": [{"title": "Alpha", "paragraphs": [
    {"context": "Alpha Town was founded in 1850 by river traders.",
     "qas": [{"id": "q1", "question": "When was Alpha Town founded?",
              "answers": [{"text": "1850", "answer_start": 26}]}]},
    {"context": "The mayor of Alpha Town is Jane Doe.",
     "qas": [{"id": "q2", "question": "Who is the mayor of Alpha Town?",
              "answers": [{"text": "Jane Doe", "answer_start": 27}]}]},
]}]}


@pytest.fixture(scope="module")
def lm():
    return nm.load_model("random:tiny")


def test_every_published_shape_is_listed_with_consistent_geometry():
    assert {"tiny", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-1.5b", "qwen2.5-7b"} <= set(RANDOM_MODELS)
    for name, shape in RANDOM_MODELS.items():
        assert shape["model_type"] in ("llama", "qwen2"), name
        assert shape["num_attention_heads"] % shape["num_key_value_heads"] == 0, name
        assert shape["vocab_size"] > 49152, name  # larger than the default tokenizer's: the real LM-head cost


def test_tiny_has_the_geometry_of_the_table(lm):
    shape = RANDOM_MODELS["tiny"]
    cfg, model = lm.config, lm.model
    assert lm.random_weights is True and lm.device.type == "cpu" and lm.dtype == torch.float32
    assert cfg.num_hidden_layers == len(model.model.layers) == shape["num_hidden_layers"]
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.weight.shape == (shape["num_attention_heads"] * shape["head_dim"], shape["hidden_size"])
    assert attn.k_proj.weight.shape == (shape["num_key_value_heads"] * shape["head_dim"], shape["hidden_size"])
    assert mlp.gate_proj.weight.shape == (shape["intermediate_size"], shape["hidden_size"])
    assert model.lm_head.weight.shape == (shape["vocab_size"], shape["hidden_size"])
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == shape["tie_word_embeddings"]
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.max_position_embeddings == lm.max_context
    assert cfg.rms_norm_eps == shape["rms_norm_eps"]
    # every weight was initialised (nothing left as uninitialised memory)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_generation_with_a_vocab_larger_than_the_tokenizer(lm):
    assert lm.config.vocab_size > len(lm.tokenizer)
    # ids the tokenizer does not have decode to nothing instead of failing
    assert isinstance(lm.tokenizer.decode([len(lm.tokenizer) + 7, 100_000], skip_special_tokens=True), str)
    g = lm.generate(lm.chat_ids("hi"), max_new_tokens=4)
    assert isinstance(g.text, str) and 1 <= g.new_tokens <= 4 and len(g.token_ids) == g.new_tokens
    assert all(0 <= t < lm.config.vocab_size for t in g.token_ids)
    assert isinstance(lm.chat("hello?", max_new_tokens=3), str)


def test_fingerprint_and_deterministic_weights(lm):
    fp = lm.fingerprint
    assert fp.name == "random:tiny" and fp.revision == "random-init:seed=0" and fp.dtype == "float32"
    assert (fp.hidden_size, fp.num_layers) == (RANDOM_MODELS["tiny"]["hidden_size"],
                                               RANDOM_MODELS["tiny"]["num_hidden_layers"])
    again = nm.load_model("random:tiny@0")
    assert again.fingerprint == fp
    assert all(torch.equal(a, b) for a, b in zip(lm.model.parameters(), again.model.parameters(), strict=True))
    other = nm.load_model("random:tiny@1", dtype="bfloat16")
    assert other.fingerprint.revision == "random-init:seed=1" and other.dtype == torch.bfloat16
    assert lm.fingerprint.mismatch(other.fingerprint) == "revision"
    assert not torch.equal(lm.model.lm_head.weight.bfloat16(), other.model.lm_head.weight)
    assert tiny_lm().random_weights is False


def test_unknown_name_or_bad_seed_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="unknown random model 'random:llama-9b'.*random:llama-3.1-8b"):
        nm.load_model("random:llama-9b")
    with pytest.raises(ModelLoadError, match="integer SEED"):
        nm.load_model("random:tiny@x")


def test_info_command_accepts_a_random_model():
    res = CliRunner().invoke(app, ["info", "--model", "random:tiny"])
    assert res.exit_code == 0, res.output
    assert "random:tiny" in res.output and "random-init:seed=0" in res.output
    res = CliRunner().invoke(app, ["info", "--model", "random:nope"])
    assert res.exit_code != 0 and "random:qwen2.5-7b" in res.output


def test_benchmark_results_and_report_mark_random_runs(lm, tmp_path):
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(_SQUAD))
    runs = {}
    for label, model in (("random", lm), ("real", tiny_lm())):
        out = tmp_path / label
        runs[label] = run_benchmark("squad", model, arms=["none"], limit=2, out=out, data=data,
                                    max_new_tokens=2, progress=False)
    assert runs["random"]["random_weights"] is True
    assert json.loads((tmp_path / "random" / "results.json").read_text())["random_weights"] is True
    assert "random_weights" not in runs["real"]
    text = report([tmp_path / "random", tmp_path / "real"], out=tmp_path / "report")
    assert text.count(RANDOM_WEIGHTS_NOTE) == 1
    line = next(i for i, t in enumerate(text.splitlines()) if t.startswith(f"- `{tmp_path / 'random'}`"))
    assert RANDOM_WEIGHTS_NOTE in text.splitlines()[line + 1]
