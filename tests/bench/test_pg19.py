"""PG-19 streaming benchmark on two made-up books and a tiny model."""

import json
import math

import pytest
from testing import save_tiny_lm, tiny_lm

from nativemem.bench.tasks.pg19 import cut_gutenberg, load_books, run_pg19
from nativemem.errors import DataError, InputError

BODY = ("The old captain walked along the pier every morning. He counted the boats and the gulls, and the "
        "harbour master waved at him from the window. ") * 6
BOOK = (f"The Project Gutenberg eBook of A Made-Up Tale\n\nLicence text.\n\n"
        f"*** START OF THIS PROJECT GUTENBERG EBOOK A MADE-UP\nTALE ***\n\n{BODY}\n\n"
        f"***END OF THE PROJECT GUTENBERG EBOOK A MADE-UP TALE***\n\nMore licence text.\n")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def books(tmp_path):
    folder = tmp_path / "pg19"
    folder.mkdir()
    (folder / "111.txt").write_text(BOOK)
    (folder / "222.txt").write_text(BODY.replace("captain", "sailor"))  # no markers: used whole
    (folder / "pg19_metadata_subset.csv").write_text("book_id,short_book_title,publication_date,book_link\n"
                                                     "111,A Made-Up Tale,1900,x\n")
    return folder


def test_cut_between_markers_and_titles(books):
    body, cut = cut_gutenberg(BOOK)
    assert cut and body.startswith("The old captain") and body.endswith("window.")
    loaded = load_books(books)
    assert [(b.id, b.title, b.cut) for b in loaded] == [("111", "A Made-Up Tale", True), ("222", "222", False)]
    with pytest.raises(DataError, match="not found"):
        load_books(books / "missing")


def test_run_pg19_scores_every_window_before_training(books, tmp_path):
    lm = tiny_lm()
    out = tmp_path / "run"
    res = run_pg19(lm, out=out, data=books, window=16, context=16, max_tokens=80, width=2, lr=1e-2,
                   lora_rank=2, lora_lr=1e-2, progress=False, checkpoints=(32, 64))
    assert set(res["arms"]) == {"window_only", "side_ffn", "lora"}
    for b in res["books"]:
        assert b["tokens"] == 80
        wo, sf, lo = (b["arms"][a] for a in ("window_only", "side_ffn", "lora"))
        assert wo["extra_params"] == 0 and sf["extra_params"] == 3 * 2 * 32 * 2 and lo["extra_params"] > 0
        assert set(sf["ppl_at"]) == {"32", "64"} and sf["steps"] == 5 and wo["steps"] == 0
        assert sf["time_rel_cpu"] > 0 and isinstance(sf["below_window_only"], bool)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    first = {(r["book"], r["arm"]): r["nll_sum"] for r in items if r["index"] == 0}
    for book in ("111", "222"):  # window 0 is scored before any training: all arms agree
        assert first[(book, "side_ffn")] == pytest.approx(first[(book, "window_only")], abs=1e-4)
        assert first[(book, "lora")] == pytest.approx(first[(book, "window_only")], abs=1e-4)
    pooled = sum(r["nll_sum"] for r in items if r["arm"] == "side_ffn") / 160
    assert res["arms"]["side_ffn"]["metrics"]["ppl"] == pytest.approx(math.exp(pooled))
    assert {c["metric"] for c in res["comparisons"]} == {"nll"} and len(res["comparisons"]) == 3
    assert (out / "pg19_ppl.png").stat().st_size > 0 and "pooled" in (out / "pg19_report.md").read_text()
    json.loads((out / "results.json").read_text())


def test_bad_pg19_input(books, tmp_path):
    lm = tiny_lm()
    short = tmp_path / "short.txt"
    short.write_text("A very short book.")
    with pytest.raises(InputError, match="shorter than one window of 16"):
        run_pg19(lm, out=tmp_path, data=short, window=16, context=16, progress=False)
    with pytest.raises(InputError, match="exceed the model's window"):
        run_pg19(lm, out=tmp_path, data=books, window=500, context=100, progress=False)
    with pytest.raises(InputError, match="unknown pg19 arms"):
        run_pg19(lm, out=tmp_path, data=books, arms=["rag_bm25"], progress=False)
    with pytest.raises(InputError, match="unknown pg19 options"):
        run_pg19(lm, out=tmp_path, data=books, windw=16, progress=False)


def test_bench_cli_runs_pg19_with_task_options(books, tmp_path):
    from typer.testing import CliRunner

    from nativemem.cli.main import app

    model = save_tiny_lm(tmp_path / "tiny-model")
    out = tmp_path / "cli"
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "pg19", "--arms", "window_only,side_ffn", "--data", str(books), "--model",
                              str(model), "--out", str(out), "-o", "window=16", "-o", "context=16",
                              "-o", "max_tokens=48", "-o", "width=2", "-o", "checkpoints=[32]"])
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"window_only", "side_ffn"} and results["config"]["max_tokens"] == 48
    assert all(b["tokens"] == 48 for b in results["books"]) and "side_ffn: " in res.output
    # bad names fail before the model loads, naming what is known
    for args, message in ((["-o", "windw=16"], "unknown pg19 options ['windw']"),
                          (["--arms", "window_only,rag"], "unknown pg19 arms ['rag']"),
                          (["--facts", "10"], "--facts applies to the facts task only")):
        res = runner.invoke(app, ["bench", "pg19", "--data", str(books), "--model", str(model),
                                  "--out", str(out), *args])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
