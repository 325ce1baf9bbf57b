"""The README's Python snippets run as written, in order, on the real default model (the server snippet against
a real server of that model, its URL swapped for the test server's)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SERVER_URL = "http://127.0.0.1:8000"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_snippets():
    assert len(snippets()) >= 4


def test_readme_python_snippets_run_as_written(real_lm, tmp_path, monkeypatch):
    import nativemem as nm
    from nativemem.server import KeyRing, ServerThread, create_app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(nm, "load_model", _reuse(nm.load_model, real_lm))
    namespace: dict = {}
    for n, code in enumerate(snippets()):
        if SERVER_URL in code:
            memory = nm.open_memory(tmp_path / "team.mem", real_lm, kind="activation")
            app = create_app(keys=KeyRing({"sk-alice-change-me": "alice"}), lm=real_lm, memory=memory)
            with ServerThread(app) as server:
                exec(compile(code.replace(SERVER_URL, server.url), f"README snippet {n}", "exec"), namespace)
            answer = namespace["answer"]
            assert answer.choices[0].message.content and "memory_ids" in answer.model_extra["nativemem"]
            memory.close()
            continue
        exec(compile(code, f"README snippet {n}", "exec"), namespace)
    assert namespace["mem"].items(user_id="alice")[0]["text"] == "Marie Curie was born in Warsaw in 1867."
    assert namespace["g"].text and namespace["logits"].shape[-1] == real_lm.model.config.vocab_size


def _reuse(load, real_lm):
    """``load_model()`` of the default model answers with the session's loaded one (the same model, loaded once)."""
    def load_model(name=None, **kwargs):
        return real_lm if name is None and not kwargs else load(name, **kwargs)

    return load_model

