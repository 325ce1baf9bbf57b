"""Consolidation of a user's activation memories into side_ffn / pkm: library, CLI and endpoint."""

from __future__ import annotations

import gc
import json
import threading
import time

import httpx
from conftest import start_server
from typer.testing import CliRunner

import nativemem as nm
from nativemem.consolidate import completion_probes, consolidate, question_probes
from nativemem.server import ServerSettings

TEXTS = ["The Velmora Institute was founded by Ada Quell in Tollen. The Amber Finch nests on Tollen Island.",
         "Bob keeps his red bicycle in the garden shed."]


def test_completion_probes_take_the_last_word():
    probes = completion_probes(["The Amber Finch nests on Tollen Island. Too short."])
    assert probes == [("The Amber Finch nests on Tollen Island.", "The Amber Finch nests on Tollen", "Island.")]


def test_question_probes_ask_a_held_out_question_about_each_stated_fact():
    from nativemem.memories.pkm import RELATIONS

    probes = question_probes(["Ada Lind works for Nordic Robotics. It rains. Bob was born in Oslo."])
    held_out = {q.format(e=e) for r, e in (("employer", "Ada Lind"), ("birth_city", "Bob"))
                for q in RELATIONS[r]["heldout"]}
    assert [a for _, a in probes] == ["Nordic Robotics", "Oslo"] and {q for q, _ in probes} <= held_out


def test_consolidate_reads_only_the_users_chunks_and_reports_before_after(tmp_path, model_dir):
    lm = nm.load_model(model_dir)
    act = nm.open_memory(tmp_path / "act", lm, kind="activation")
    mine = act.add(TEXTS[:1], user_id="alice").ids
    act.add(TEXTS[1:], user_id="bob")
    for kind in ("side_ffn", "pkm"):
        target = nm.open_memory(tmp_path / kind, lm, kind=kind)
        receipt = consolidate(act, target, user_id="alice")
        assert receipt.op == "consolidate" and not receipt.did_nothing
        assert receipt.details["source_ids"] == mine and receipt.details["probes"] == 2
        for when in ("before", "after"):
            assert 0.0 <= receipt.details[when]["recall"] <= 1.0 and receipt.details[when]["mean_nll"] > 0
            assert receipt.details[when]["questions"]["asked"] == 0  # no sentence of alice's states an attribute
        assert consolidate(act, target, user_id="carol").did_nothing
    act.close()
    del act
    gc.collect()


def test_consolidate_command_and_endpoint(tmp_path, model_dir, served):
    from nativemem.cli.main import app

    lm = nm.load_model(model_dir)
    act = nm.open_memory(tmp_path / "act", lm, kind="activation")
    act.add(TEXTS, user_id="alice")
    act.close()
    del act
    gc.collect()
    res = CliRunner().invoke(app, ["consolidate", "--memory", str(tmp_path / "act"), "--into", "side_ffn", "--out",
                                   str(tmp_path / "side"), "--user", "alice", "--model", str(model_dir)])
    assert res.exit_code == 0, res.output
    assert "before" in res.output and (tmp_path / "side" / "memory_config.json").is_file()
    res = CliRunner().invoke(app, ["consolidate", "--memory", str(tmp_path / "act"), "--into", "lora", "--out",
                                   str(tmp_path / "x"), "--model", str(model_dir)])
    assert res.exit_code == 2 and "side_ffn or pkm" in res.output

    with httpx.Client(base_url=served.url, headers=served.headers("carol"), timeout=120) as c:
        c.post("/v1/memories", json={"text": "Carol planted seven apple trees behind the old mill."})
        r = c.post("/v1/memories/consolidate", json={"into": "side_ffn"})
        assert r.status_code == 200, r.text
        body = r.json()
        owned = {m["id"] for m in c.get("/v1/memories", params={"limit": 1000}).json()["data"]}
        assert body["op"] == "consolidate" and set(body["details"]["source_ids"]) <= owned
        assert "after" in body["details"]
        assert c.post("/v1/memories/consolidate", json={"into": "activation"}).status_code == 400
        chat = {"model": "nativemem", "max_tokens": 2, "messages": [{"role": "user", "content": "Who planted trees?"}]}
        r = c.post("/v1/chat/completions", json=chat)  # the caller's consolidated memory answers along
        assert r.status_code == 200 and r.json()["nativemem"]["parametric"] == ["side_ffn"], r.text
        r = c.post("/v1/chat/completions", json={**chat, "memory": False})
        assert r.json()["nativemem"]["parametric"] == []
    with httpx.Client(base_url=served.url, headers=served.headers("alice"), timeout=120) as c:
        r = c.post("/v1/chat/completions", json=chat)  # never another user's
        assert r.status_code == 200 and r.json()["nativemem"]["parametric"] == []
    assert httpx.post(served.url + "/v1/memories/consolidate", json={"into": "pkm"}).status_code == 401


def test_a_damaged_consolidated_memory_never_locks_its_user_out(served):
    """Chats go on without it (a warning in the reply, no server path), and the user can delete it."""
    chat = {"model": "nativemem", "max_tokens": 2, "messages": [{"role": "user", "content": "Where is the mill?"}]}
    with httpx.Client(base_url=served.url, headers=served.headers("bob"), timeout=120) as c:
        c.post("/v1/memories", json={"text": "Bob's mill stands by the river Ouse."})
        assert c.post("/v1/memories/consolidate", json={"into": "side_ffn"}).status_code == 200
        assert c.post("/v1/chat/completions", json=chat).json()["nativemem"]["parametric"] == ["side_ffn"]
        folder = served.app.state.engine._consolidated_folder("bob", "side_ffn")
        (folder / "memory.safetensors").write_bytes(b"\x00garbage" * 8)
        config = folder / "memory_config.json"
        config.write_text(config.read_text())  # a new stamp: the server opens it again
        import os

        os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        extra = r.json()["nativemem"]
        assert extra["parametric"] == [] and "DELETE /v1/memories/consolidated" in extra["warnings"][0]
        assert str(folder) not in r.text and "consolidated" not in str(extra["memory_ids"])
        r = c.post("/v1/memories/consolidate", json={"into": "side_ffn"})
        assert r.status_code == 400 and "DELETE /v1/memories/consolidated" in r.text and str(folder) not in r.text
        assert c.delete("/v1/memories/consolidated", params={"into": "lora"}).status_code == 400
        r = c.delete("/v1/memories/consolidated")
        assert r.status_code == 200 and r.json()["deleted"] == ["side_ffn"], r.text
        r = c.post("/v1/chat/completions", json=chat)
        assert r.json()["nativemem"]["parametric"] == [] and r.json()["nativemem"]["warnings"] == []
        assert c.delete("/v1/memories/consolidated").json()["deleted"] == []


def test_a_disk_too_full_for_writes_is_said_at_start(tmp_path, model_dir):
    import pytest

    from nativemem.errors import InputError
    from nativemem.server.engine import Engine

    lm = nm.load_model(model_dir)
    mem = nm.open_memory(tmp_path / "m", lm, kind="activation", gate_threshold=0.0, min_free_bytes=2**60)
    with pytest.raises(InputError, match="not enough free disk space"):
        Engine(lm, mem)
    mem.config.min_free_bytes = 0
    assert Engine(lm, mem).memory is mem


def _many_notes(n_texts: int = 8) -> list[str]:
    return [" ".join(f"Parcel {t}.{m} for flat {t} waits at desk number {m + 3}." for m in range(8))
            for t in range(n_texts)]


def _chat_body(question: str) -> dict:
    return {"model": "nativemem", "max_tokens": 4, "messages": [{"role": "user", "content": question}]}


def test_a_consolidation_takes_the_model_step_by_step_and_runs_as_a_cancellable_job(model_dir):
    """Another user's chat and list are answered while a consolidation trains; with ``background`` it is a job
    (202, its receipt at GET /v1/jobs/{id}, another user's job id answers 404, DELETE cancels it and nothing is
    saved); a request past its timeout stops at the next step and saves nothing."""
    with start_server(model_dir, ["alice", "bob"], settings=ServerSettings(max_body_bytes=1 << 20)) as s:
        def client(user):
            return httpx.Client(base_url=s.url, headers=s.headers(user), timeout=300)

        with client("alice") as c:
            assert c.post("/v1/memories", json={"texts": _many_notes()}).status_code == 200
        result: dict = {}

        def run():
            with client("alice") as c:
                result["response"] = c.post("/v1/memories/consolidate", json={"into": "pkm"})
                result["done"] = time.monotonic()

        worker = threading.Thread(target=run)
        worker.start()
        with client("bob") as c:
            time.sleep(0.5)  # the consolidation is under way
            chat = c.post("/v1/chat/completions", json=_chat_body("Hello?"))
            listed = c.get("/v1/memories")
            answered = time.monotonic()
        worker.join()
        assert chat.status_code == 200 and chat.json()["nativemem"]["parametric"] == [] and listed.status_code == 200
        assert result["response"].status_code == 200, result["response"].text
        assert answered < result["done"], "bob waited for alice's whole consolidation"
        folder = s.app.state.engine._consolidated_folder("alice", "pkm")
        saved = (folder / "memory_config.json").stat().st_mtime_ns

        with client("alice") as c:
            r = c.post("/v1/memories/consolidate", json={"into": "side_ffn", "background": True})
            assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}", r.text
            job = r.json()
            assert job["status"] == "running" and job["kind"] == "consolidate"
            with client("bob") as b:  # another user's job is missing for bob
                assert b.get(f"/v1/jobs/{job['id']}").status_code == 404
                assert b.delete(f"/v1/jobs/{job['id']}").status_code == 404
                assert b.get("/v1/jobs").json()["data"] == []
            while (state := c.get(f"/v1/jobs/{job['id']}").json())["status"] == "running":
                time.sleep(0.1)
            assert state["status"] == "succeeded", state
            assert state["result"]["op"] == "consolidate" and "after" in state["result"]["details"]
            assert [j["id"] for j in c.get("/v1/jobs").json()["data"]] == [job["id"]]
            assert c.get("/v1/jobs/job-unknown").status_code == 404

            r = c.post("/v1/memories/consolidate", json={"into": "pkm", "background": True})
            cancelled = c.delete(f"/v1/jobs/{r.json()['id']}")
            assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"]
            while (state := c.get(f"/v1/jobs/{r.json()['id']}").json())["status"] == "running":
                time.sleep(0.1)
            assert state["status"] == "cancelled" and state["result"] is None, state
            assert str(folder) not in json.dumps(state)
            assert (folder / "memory_config.json").stat().st_mtime_ns == saved, "a cancelled job saved its memory"
            assert c.post("/v1/memories/consolidate", json={"into": "pkm", "background": "yes"}).status_code == 400

    with start_server(model_dir, ["alice"], settings=ServerSettings(request_timeout_s=1.0)) as s:
        with httpx.Client(base_url=s.url, headers=s.headers("alice"), timeout=300) as c:
            assert c.post("/v1/memories", json={"texts": _many_notes()}).status_code == 200
            r = c.post("/v1/memories/consolidate", json={"into": "pkm"})
            assert r.status_code == 504 and "timed out" in r.json()["error"]["message"], r.text
        folder = s.app.state.engine._consolidated_folder("alice", "pkm")
        assert nm.open_memory(folder, s.lm).items(user_id="alice") == [], "a timed-out consolidation saved facts"
        assert s.app.state.engine.training_lock.acquire(blocking=False)
