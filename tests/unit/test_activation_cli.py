"""CLI commands of activation memory (search, chat, fit) on a tiny model saved to a folder."""

import pytest
import typer
from activation_helpers import fast_dir  # noqa: F401
from testing import save_tiny_lm, tiny_lm
from typer.testing import CliRunner

import nativemem as nm
from nativemem.cli.activation_cmds import register


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_lm(root / "model")
    loaded = nm.load_model(root / "model")
    mem = nm.open_memory(root / "m", loaded, kind="activation")
    mem.add(["Ada Quell founded the Velmora Institute in 1987.", "The Amber Finch nests on Tollen Island."],
            user_id="u")
    mem.close()
    del mem
    import gc

    gc.collect()  # release the folder for the CLI commands
    app = typer.Typer()
    register(app)
    return app, root


def test_search_prints_the_users_hits(setup):
    app, root = setup
    res = CliRunner().invoke(app, ["search", "Who founded the institute?", "--memory", str(root / "m"), "--user",
                                   "u", "--model", str(root / "model"), "-k", "1"])
    assert res.exit_code == 0, res.output
    assert "result(s)" in res.output
    res = CliRunner().invoke(app, ["search", "Who founded it?", "--memory", str(root / "m"), "--user", "other",
                                   "--model", str(root / "model")])
    assert res.exit_code == 0 and "no memories found for user 'other'" in res.output


def test_chat_answers_with_injected_memory_until_an_empty_line(setup):
    app, root = setup
    res = CliRunner().invoke(app, ["chat", "--memory", str(root / "m"), "--user", "u", "--model", str(root / "model"),
                                   "--max-new-tokens", "3"], input="Where does the Amber Finch nest?\n\n")
    assert res.exit_code == 0, res.output
    assert "memory tokens injected" in res.output and "TTFT" in res.output


def test_fit_and_bad_folder(setup, tmp_path):
    app, root = setup
    fit_file = tmp_path / "fit.txt"
    from activation_helpers import FIT_TEXTS

    fit_file.write_text("\n\n".join(FIT_TEXTS))
    res = CliRunner().invoke(app, ["fit", str(fit_file), "--memory", str(tmp_path / "new"), "--model",
                                   str(root / "model")])
    assert res.exit_code == 0, res.output
    assert "ID curve" in res.output and "retrieval layer" in res.output
    res = CliRunner().invoke(app, ["search", "x", "--memory", str(tmp_path), "--model", str(root / "model")])
    assert res.exit_code == 2 and "not a memory" in " ".join(res.output.split())


def test_activation_demo_runs_on_a_tiny_model(fast_dir):
    import io

    from rich.console import Console

    from nativemem.activation_demo import run_activation_demo
    from nativemem.demo import QUESTIONS

    out = io.StringIO()
    rows = run_activation_demo(tiny_lm("llama"), Console(file=out, width=200), max_new_tokens=2,
                               folder=fast_dir / "demo.mem")
    assert len(rows) == len(QUESTIONS)
    assert all(r["prefix_tokens"] > 0 and r["prompt_tokens"] < r["rag_prompt_tokens"] for r in rows)
    assert "payload bytes per token" in out.getvalue() and "retrieval layer" in out.getvalue()


def test_needle_command_runs_and_its_seed_picks_the_needles(setup, tmp_path):
    """`nativemem needle` end to end on a tiny model (whose window the prompts may not fit: those items are
    reported skipped) and a tiny haystack; the seed picks the needles."""
    app, root = setup
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text(" ".join(f"Sentence {i} of the essay is about gardens." for i in range(60)))
    codes = []
    for seed in ("0", "1"):
        out = tmp_path / f"needle{seed}"
        res = CliRunner().invoke(app, ["needle", "--arms", "rag_bm25", "--lengths", "100,200", "--depths", "0,1",
                                       "--data", str(hay), "--out", str(out), "--model", str(root / "model"),
                                       "--max-new-tokens", "2", "--seed", seed])
        assert res.exit_code == 0, res.output
        assert (out / "results.json").is_file() and "| rag_bm25 |" in res.output
        from nativemem.bench.results import read_items

        codes.append(sorted(a for r in read_items(out) for a in r["answers"]))
        assert len(codes[-1]) == 4
    assert codes[0] != codes[1]


def test_every_task_runs_through_nativemem_bench(setup, tmp_path):
    """`nativemem bench --list` names every task, and `nativemem bench needle` is the `needle` command."""
    from nativemem.cli.main import app

    _, root = setup
    res = CliRunner().invoke(app, ["bench", "--list"])
    assert res.exit_code == 0, res.output
    listed = " " + " ".join(res.output.split())
    for task in ("squad", "triviaqa", "needle", "scifact", "pg19", "mmlu", "locomo", "facts", "write", "scale",
                 "boundary", "relevance", "conversation"):
        assert f" {task} (" in listed, task
    res = CliRunner().invoke(app, ["bench", "conversation", "--limit", "2", "--max-new-tokens", "2", "--model",
                                   str(root / "model"), "--out", str(tmp_path / "conv")])
    assert res.exit_code == 0 and "remembered: contains" in res.output, res.output
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text(" ".join(f"Sentence {i} of the essay is about gardens." for i in range(60)))
    outs = []
    for argv in (["needle", "--lengths", "100,200", "--depths", "0,1"],
                 ["bench", "needle", "-o", "lengths=[100,200]", "-o", "depths=[0,1]", "-o", "needle_seed=0"]):
        out = tmp_path / argv[0]
        res = CliRunner().invoke(app, [*argv, "--arms", "rag_bm25", "--data", str(hay), "--out", str(out),
                                       "--model", str(root / "model"), "--max-new-tokens", "2", "--seed", "0"])
        assert res.exit_code == 0, res.output
        from nativemem.bench.results import read_items

        outs.append(sorted((r["item_id"], r["output"]) for r in read_items(out)))
    assert outs[0] == outs[1] and len(outs[0]) == 4
