"""Property-based fuzzing of the server's CLI entry points: any arguments give exit 0 or 2, never a traceback."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import nativemem.testing.reliability as reliability
import nativemem.server.run as run
from nativemem.cli.main import app

_value = st.sampled_from(["0", "-1", "65536", "1e9", "abc", "", "\x00", "127.0.0.1", "0.0.0.0", "::1", "nan",
                          "small", "full", "huge", "durability,nope", "/nonexistent/keys.json"]) | st.text(max_size=12)
_serve_opt = st.sampled_from(["--port", "--host", "--max-body-bytes", "--request-timeout-s", "--api-keys",
                              "--log-level", "--memory"])
_rel_opt = st.sampled_from(["--size", "--parts", "--seed", "--out"])


def _check(result) -> None:
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(pairs=st.lists(st.tuples(_serve_opt, _value), max_size=4), no_auth=st.booleans())
def test_serve_arguments(pairs, no_auth, tmp_path_factory):
    import uvicorn

    import nativemem as nm

    # everything of `serve` runs but loading the model and serving, which stand-ins replace
    from types import SimpleNamespace

    fakes = {(nm, "load_model"): lambda *a, **k: object(),
             (nm, "open_memory"): lambda *a, **k: SimpleNamespace(store=None),  # serve opens the store at start
             (run, "create_app"): lambda **k: None, (uvicorn, "run"): lambda *a, **k: None}
    originals = {key: getattr(*key) for key in fakes}
    for (mod, name), fake in fakes.items():
        setattr(mod, name, fake)
    try:
        args = ["serve"] + [x for p in pairs for x in p] + (["--no-auth"] if no_auth else [])
        if "--memory" not in args:
            args += ["--memory", str(tmp_path_factory.mktemp("m"))]
        _check(CliRunner().invoke(app, args))
    finally:
        for (mod, name), original in originals.items():
            setattr(mod, name, original)


@settings(max_examples=30, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(pairs=st.lists(st.tuples(_rel_opt, _value), max_size=3))
def test_reliability_arguments(pairs, tmp_path_factory):
    original = reliability.run_suite

    def fake_suite(out, *, size, model, parts, seed, log, redis_url=None):
        if size not in reliability.SIZES:
            from nativemem.errors import InputError

            raise InputError(f"unknown size {size!r}")
        return {"passed": True, "elapsed_s": 0.0}

    reliability.run_suite = fake_suite
    try:
        args = ["reliability", "--out", str(tmp_path_factory.mktemp("r"))] + [x for p in pairs for x in p]
        _check(CliRunner().invoke(app, args))
    finally:
        reliability.run_suite = original
