"""The supervisor's state file as other processes read it."""

from __future__ import annotations

import json
from pathlib import Path

from kiban.run_state import gpu_verdicts


def test_gpu_verdicts_from_the_supervisor_state(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    engines = {
        "on-gpu": {"gpus": [0], "gpu_verified": True},
        "fell-back": {"gpus": [1], "gpu_verified": False},
        "unjudged": {"gpus": [0], "gpu_verified": None},
        "cpu": {"gpus": [], "gpu_verified": None},
    }
    state.write_text(json.dumps({"engines": engines}))
    assert gpu_verdicts(str(state)) == {"on-gpu": True, "fell-back": False}
    assert gpu_verdicts(None) == {} and gpu_verdicts(str(tmp_path / "missing")) == {}
