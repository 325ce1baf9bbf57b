"""`nativemem add facts.jsonl --kind pkm` then `nativemem ask --memory` on a tiny model saved to a folder."""

import pytest
from testing import save_tiny_lm
from typer.testing import CliRunner

from nativemem.cli.main import app
from nativemem.memories.pkm import generate_facts, save_facts


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-model"), initializer_range=0.2)


def test_add_a_facts_file_then_ask(model_dir, tmp_path):
    facts = generate_facts(2, seed=3)
    path = save_facts(facts, tmp_path / "facts.jsonl")
    mem = tmp_path / "facts.mem"
    runner = CliRunner()
    opts = ["-o", "layers=[0,1]", "-o", "num_keys=16", "-o", "heads=2", "-o", "top_k=4", "-o", "key_dim=16",
            "-o", "batch_size=4", "-o", "max_epochs=60", "-o", "gate=false"]
    res = runner.invoke(app, ["add", str(path), "--memory", str(mem), "--kind", "pkm", "--model", str(model_dir), *opts])
    assert res.exit_code == 0, res.output
    assert "pkm add: 2 item(s)" in res.output and (mem / "memory.safetensors").is_file()
    res = runner.invoke(app, ["ask", facts[0].prompt, "--memory", str(mem), "--model", str(model_dir),
                              "--max-new-tokens", "40"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == facts[0].answer
    # bad input is one clear line, before any training
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q?", "answer": ""}\n')
    res = runner.invoke(app, ["add", str(bad), "--memory", str(mem), "--model", str(model_dir)])
    assert res.exit_code == 2 and "empty" in res.output
