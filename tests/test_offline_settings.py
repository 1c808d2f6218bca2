"""The package entry sets Ultralytics' offline settings whatever is imported first (new processes, real Ultralytics)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from yolo_compress import INTEGRATIONS_OFF

REPO = Path(__file__).resolve().parents[1]
OURS = ("YOLO_CONFIG_DIR", "YOLO_OFFLINE", "ULTRALYTICS_SAFE_LOAD")
REPORT = """
import json, os, sys
import ultralytics.nn.tasks as tasks
from ultralytics.utils import SETTINGS
from yolo_compress import INTEGRATIONS_OFF
print(json.dumps({"env": {k: os.environ.get(k) for k in ("YOLO_CONFIG_DIR", "YOLO_OFFLINE", "ULTRALYTICS_SAFE_LOAD")},
                  "file": str(SETTINGS.file), "settings": {k: SETTINGS[k] for k in INTEGRATIONS_OFF},
                  "safe_load": tasks.SAFE_LOAD, "models_imported": "yolo_compress.models" in sys.modules}))
"""


def _fresh(code: str, cwd: Path, **env: str) -> dict:
    """What REPORT prints after `code` ran in a new interpreter whose environment has none of OURS set."""
    base = {k: v for k, v in os.environ.items() if k not in OURS}
    proc = subprocess.run([sys.executable, "-c", f"{code}\n{REPORT}"], cwd=cwd, capture_output=True, text=True,
                          env={**base, "PYTHONPATH": str(REPO), **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_module_that_imports_ultralytics_first_gets_the_offline_settings(tmp_path: Path) -> None:
    # distill_losses' first imports are torch and ultralytics; yolo_compress.models is never imported
    got = _fresh("import yolo_compress.train.distill_losses", tmp_path)
    assert not got["models_imported"]
    config = tmp_path / ".ultralytics"
    assert got["env"] == {"YOLO_CONFIG_DIR": str(config), "YOLO_OFFLINE": "1", "ULTRALYTICS_SAFE_LOAD": "1"}
    assert Path(got["file"]).is_relative_to(config)  # the settings file is the project's, not the user's
    assert got["settings"] == dict.fromkeys(INTEGRATIONS_OFF, False)
    assert got["safe_load"] is True  # Ultralytics read ULTRALYTICS_SAFE_LOAD at its import
    saved = json.loads(Path(got["file"]).read_text())  # and the next process starts from them
    assert {k: saved[k] for k in INTEGRATIONS_OFF} == dict.fromkeys(INTEGRATIONS_OFF, False)


def test_integrations_are_switched_off_when_ultralytics_was_imported_before_the_package(tmp_path: Path) -> None:
    code = ("from ultralytics.utils import SETTINGS\nassert SETTINGS['mlflow'] and SETTINGS['dvc']  # defaults\n"
            "import yolo_compress.files")
    got = _fresh(code, tmp_path, YOLO_CONFIG_DIR=str(tmp_path / "cfg"))
    assert got["settings"] == dict.fromkeys(INTEGRATIONS_OFF, False)
    assert got["env"]["YOLO_CONFIG_DIR"] == str(tmp_path / "cfg")  # a user's own setting wins
