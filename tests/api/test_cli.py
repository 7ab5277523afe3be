"""`posttrain validate` and `posttrain crd` as a user runs them, plus import hygiene."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from posttrain.cli import main

from .test_spec import MINIMAL, job

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, *docs: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_validate_valid(tmp_path: Path, capsys) -> None:
    doc = job(**{"spec.output": {"dir": "gs://b/out"}})
    assert main(["validate", str(write(tmp_path, doc))]) == 0
    assert "t: valid" in capsys.readouterr().out


def test_validate_refuses_what_the_operator_refuses(tmp_path: Path, capsys) -> None:
    # neither output.dir nor checkpoint.dir: the CRD's CEL rule and the operator refuse it too
    assert main(["validate", str(write(tmp_path, MINIMAL))]) == 1
    assert "spec.output.dir: required in a cluster, or training.checkpoint.dir" in (
        capsys.readouterr().err
    )
    beside = job(**{"spec.training.checkpoint": {"dir": "gs://b/ckpt/run"}})
    assert main(["validate", str(write(tmp_path, beside))]) == 0


def test_validate_multi_document_reports_each_error(tmp_path: Path, capsys) -> None:
    bad = job(**{"metadata.name": "bad", "spec.training.steps": 0, "spec.trainnig": {}})
    path = write(tmp_path, MINIMAL, bad)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "bad: invalid" in err
    assert "spec.training.steps:" in err
    assert "spec.trainnig: unknown field 'trainnig'; did you mean 'training'?" in err


def test_validate_broken_yaml_and_missing_file(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    assert main(["validate", str(broken), str(tmp_path / "nope.yaml")]) == 1
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "nope.yaml" in err


def test_crd_command_prints_the_checked_in_crd(capsys) -> None:
    assert main(["crd"]) == 0
    assert (
        capsys.readouterr().out == (ROOT / "crds" / "posttrain.dev_posttrainjobs.yaml").read_text()
    )


def test_api_and_cli_import_without_jax_or_kopf() -> None:
    code = (
        "import sys, posttrain.api, posttrain.cli, posttrain.runtime;"
        "from posttrain.cli import build_parser; build_parser();"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'jax', 'flax', 'kopf', 'kubernetes'});"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_operator_name_is_still_the_standard_library() -> None:
    code = "import operator, posttrain.operator; assert operator.__file__.endswith('/operator.py'), operator.__file__"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
