"""The wheel: one distribution `posttrain` whose three roots land under the `posttrain` namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_maps_operator_and_trainer_under_posttrain(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("posttrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "posttrain/operator/__init__.py" in names
    assert "posttrain/trainer/__init__.py" in names
    assert "posttrain/api/v1alpha1.py" in names
    tops = {
        n.split("/", 1)[0]
        for n in names
        if not n.split("/", 1)[0].endswith((".dist-info", ".data"))
    }
    assert tops == {"posttrain"}, f"unexpected top-level packages: {tops}"
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    # The core install pulls in neither JAX nor kopf: those sit behind extras.
    core = [
        line
        for line in text.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert core and not any(("jax" in line or "kopf" in line) for line in core), core
