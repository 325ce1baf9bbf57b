"""`nativemem add` and `nativemem fuse` on a tiny model saved to a folder; the fused folder answers `ask`."""

import pytest
from testing import save_tiny_lm
from typer.testing import CliRunner

from nativemem.cli.main import app
from nativemem.cli.memory_cmds import parse_options
from nativemem.errors import InputError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-model"))


def test_add_then_fuse_then_ask(model_dir, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("Marie Curie was born in Warsaw in 1867. Paris is the capital of France. " * 5)
    runner = CliRunner()
    mem = tmp_path / "book.mem"
    args = ["add", str(book), "--memory", str(mem), "--kind", "side_ffn", "--model", str(model_dir),
            "-o", "width=4", "-o", "window=32", "-o", "context=32"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "side_ffn add: 1 item(s)" in res.output and (mem / "memory.safetensors").is_file()
    # a second add trains the existing memory; passing config again is refused
    res = runner.invoke(app, ["add", str(book), "--memory", str(mem), "--model", str(model_dir)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "config is fixed" in res.output
    out = tmp_path / "fused"
    res = runner.invoke(app, ["fuse", "--memory", str(mem), "--out", str(out), "--model", str(model_dir)])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file() and '"intermediate_size": 41' in (out / "config.json").read_text()
    res = runner.invoke(app, ["ask", "Where was Marie Curie born?", "--model", str(out), "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    # refusing to overwrite, and fusing a memory into another model
    res = runner.invoke(app, ["fuse", "--memory", str(mem), "--out", str(out), "--model", str(model_dir)])
    assert res.exit_code == 2 and "not an empty folder" in res.output
    res = runner.invoke(app, ["fuse", "--memory", str(mem), "--out", str(tmp_path / "x"), "--model", str(out)])
    assert res.exit_code == 2 and "built for another model" in res.output


def test_add_errors_are_one_line(model_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["add", str(tmp_path / "missing.txt"), "--memory", str(tmp_path / "m"), "--kind",
                              "side_ffn", "--model", str(model_dir)])
    assert res.exit_code == 2 and "file not found" in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("  ")
    res = runner.invoke(app, ["add", str(empty), "--memory", str(tmp_path / "m"), "--kind", "side_ffn"])
    assert res.exit_code == 2 and "whitespace" in res.output
    book = tmp_path / "b.txt"
    book.write_text("Some text.")
    res = runner.invoke(app, ["add", str(book), "--memory", str(tmp_path / "m"), "--kind", "side_fn"])
    assert res.exit_code == 2 and "Did you mean 'side_ffn'" in res.output
    res = runner.invoke(app, ["add", str(book), "--memory", str(tmp_path / "m"), "--kind", "side_ffn",
                              "--model", str(model_dir), "-o", "width=0"])
    assert res.exit_code == 2 and "width must be a positive integer" in res.output


def test_parse_options():
    assert parse_options(["width=8", "layers=[0, 1]", "init=lowest", "grow=true", "lr=3e-3"]) == {
        "width": 8, "layers": [0, 1], "init": "lowest", "grow": True, "lr": 3e-3}
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_options(["width"])
