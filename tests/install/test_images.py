"""The container images: lint, structure, build context, and (slow) the install they perform.

No image can be built here (no Docker engine). Instead: hadolint lints the Dockerfiles; the
official BuildKit parser (`dockerfile`) reads them to check user, entrypoint and layer order;
docker's own .dockerignore matcher (docker-py) computes the build context; and the slow tests
install that context into a clean virtual environment with the Dockerfile's two pip steps and
run the image's entrypoint command there.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import pytest
from docker.utils.build import exclude_paths
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
IMAGES = {
    "operator": REPO / "images/operator/Dockerfile",
    "trainer": REPO / "images/trainer/Dockerfile",
}
# The entrypoint each image must run, and the extras it installs (pyproject.toml).
ENTRYPOINTS = {
    "operator": ["posttrain", "operator"],
    "trainer": ["python", "-m", "posttrain.trainer"],
}
EXTRAS = {"operator": ["operator"], "trainer": ["trainer", "gcs"]}
SOURCE_DIRS = ("posttrain", "operator", "trainer")
HADOLINT = Path(sys.executable).with_name("hadolint")


def parse(image: str) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(IMAGES[image])))


def final_stage(commands: list[dockerfile.Command]) -> list[dockerfile.Command]:
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[last_from:]


def build_context() -> set[str]:
    """The files `docker build .` sends from the repository root, per .dockerignore."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    return set(exclude_paths(str(REPO), patterns))


def tracked(*paths: str) -> set[str]:
    out = subprocess.run(
        ["git", "ls-files", "--", *paths], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return {p for p in out.splitlines() if (REPO / p).exists()}


# ---- lint -------------------------------------------------------------------------------


def hadolint(*args: str) -> subprocess.CompletedProcess:
    if not HADOLINT.exists():
        pytest.fail(f"hadolint is not installed beside {sys.executable}; pip install -e '.[dev]'")
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "style", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_passes_hadolint(image: str) -> None:
    proc = hadolint(str(IMAGES[image]))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_live(tmp_path: Path) -> None:
    """The lint above can fail: an unpinned, root, `latest` Dockerfile is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install kopf\nCMD posttrain operator\n")
    proc = hadolint(str(bad))
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3025"):  # latest tag, unpinned pip, shell-form CMD
        assert rule in proc.stdout, proc.stdout


# ---- structure --------------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_runs_as_non_root_with_the_entrypoint(image: str) -> None:
    stage = final_stage(parse(image))
    users = [c.value[0] for c in stage if c.cmd == "USER"]
    assert users, f"{image}: the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert uid.isdigit() and int(uid) != 0, f"{image}: USER {users[-1]} is not a numeric non-root"
    entrypoints = [c for c in stage if c.cmd == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1].json, f"{image}: ENTRYPOINT must be exec (JSON) form"
    assert list(entrypoints[-1].value) == ENTRYPOINTS[image]


def test_trainer_entrypoint_is_the_command_the_operator_renders() -> None:
    """The operator sets the trainer pods' command; it must be the image's own entrypoint."""
    from posttrain.operator.render import TRAINER_COMMAND

    assert list(TRAINER_COMMAND) == ENTRYPOINTS["trainer"]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dependencies_install_before_the_source_is_copied(image: str) -> None:
    """A code change must not invalidate the dependency layer: deps come from pyproject alone."""
    build = parse(image)[: max(i for i, c in enumerate(parse(image)) if c.cmd == "FROM")]
    copies = [(i, c) for i, c in enumerate(build) if c.cmd == "COPY"]
    runs = [(i, c) for i, c in enumerate(build) if c.cmd == "RUN"]
    dep_install = next((i, c) for i, c in runs if "pip install -r requirements.txt" in c.value[0])
    extras = " ".join(EXTRAS[image])
    assert f"requirements.py pyproject.toml {extras} > requirements.txt" in dep_install[1].value[0]
    before = [c for i, c in copies if i < dep_install[0]]
    copied_before = {src for c in before for src in c.value[:-1]}
    assert copied_before == {"pyproject.toml", "images/requirements.py"}, copied_before
    source_copies = [i for i, c in copies if set(c.value[:-1]) & set(SOURCE_DIRS)]
    assert {src for i, c in copies for src in c.value[:-1]} >= set(SOURCE_DIRS)
    assert min(source_copies) > dep_install[0]
    package_install = next(i for i, c in runs if "pip install --no-deps ." in c.value[0])
    assert package_install > max(source_copies)
    # The package step adds nothing to the environment but posttrain itself.
    assert "--no-deps" in build[package_install].value[0]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_pip_uses_a_build_cache_not_an_image_layer(image: str) -> None:
    for c in parse(image):
        if c.cmd == "RUN" and "pip install" in c.value[0]:
            assert any(f.startswith("--mount=type=cache") for f in c.flags), c.original


def test_operator_image_has_no_jax() -> None:
    instructions = " ".join(c.original for c in parse("operator"))
    assert "jax" not in instructions.lower()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    operator_deps = [
        Requirement(r).name
        for r in pyproject["project"]["dependencies"]
        + pyproject["project"]["optional-dependencies"]["operator"]
    ]
    assert not {"jax", "jaxlib", "flax"} & set(operator_deps), operator_deps


def test_trainer_build_args_select_the_jax_variant() -> None:
    commands = parse("trainer")
    args = {c.value[0].split("=")[0]: c.value[0] for c in commands if c.cmd == "ARG"}
    assert {"JAX_EXTRA", "JAX_VERSION"} <= set(args)
    install = next(c for c in commands if c.cmd == "RUN" and "requirements.txt" in c.value[0])
    assert '"jax[${JAX_EXTRA}]==${JAX_VERSION}"' in install.value[0]
    # Every documented variant is an extra JAX really has (so `pip install jax[X]` resolves).
    text = IMAGES["trainer"].read_text()
    jax_extras = set(importlib.metadata.metadata("jax").get_all("Provides-Extra") or [])
    for variant in ("tpu", "cuda12", "cpu"):
        assert f"JAX_EXTRA={variant}" in text
        assert variant in jax_extras, f"jax has no extra {variant!r}: {sorted(jax_extras)}"
    # The pinned JAX is one the project accepts.
    pinned = args["JAX_VERSION"].split("=", 1)[1]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    jax = next(
        Requirement(r)
        for r in pyproject["project"]["optional-dependencies"]["trainer"]
        if Requirement(r).name == "jax"
    )
    assert jax.specifier.contains(pinned), f"JAX_VERSION={pinned} is outside pyproject's {jax}"


# ---- build context ----------------------------------------------------------------------


def test_build_context_holds_what_the_dockerfiles_copy_and_nothing_local() -> None:
    context = build_context()
    for image in IMAGES:
        for c in parse(image):
            if c.cmd != "COPY" or any(f.startswith("--from") for f in c.flags):
                continue
            for src in c.value[:-1]:
                assert src in context or any(p.startswith(src + "/") for p in context), (
                    f"{image}: COPY {src} is excluded by .dockerignore"
                )
    # Every tracked source file goes in (a file left out would break the image at run time) ...
    missing = tracked(*SOURCE_DIRS) - context
    assert not {p for p in missing if not p.endswith(".pyc")}, sorted(missing)[:10]
    # ... and nothing local or bulky does.
    for path in context:
        top = path.split("/", 1)[0]
        assert top not in {".git", ".venv", ".cluster", "tests", "docs", "runs", "out", "charts"}
        assert "__pycache__" not in path and not path.endswith(".pyc"), path


# ---- the install each image performs, in a clean virtual environment (slow) ---------------


def install_like_the_dockerfile(image: str, tmp_path: Path, extra_requirements: list[str]) -> Path:
    """Copy the build context, then run the Dockerfile's two pip steps in a fresh venv.

    pip's cache (~/.cache/pip, or PIP_CACHE_DIR) is left on, so a second run downloads nothing.
    """
    context = tmp_path / "context"
    for rel in build_context():
        dest = context / rel
        if (REPO / rel).is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, pip = str(venv / "bin/python"), str(venv / "bin/pip")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    reqs = subprocess.run(
        [py, "images/requirements.py", "pyproject.toml", *EXTRAS[image]],
        cwd=context,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    (context / "requirements.txt").write_text("\n".join(reqs) + "\n")
    for step in (
        # `pip`, not `python -m pip`: the latter puts the context on sys.path, where its
        # operator/ folder shadows the standard library's `operator` (as in the Dockerfile).
        # --no-compile: byte-compiling thousands of files is most of the time here and
        # proves nothing about the install (the image compiles them).
        [pip, "install", "-q", "--no-compile", "-r", "requirements.txt", *extra_requirements],
        [pip, "install", "-q", "--no-compile", "--no-deps", "."],
    ):
        proc = subprocess.run(step, cwd=context, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (
            f"{' '.join(step)}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )
    return venv


def run_in(venv: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    # Run away from the repository so that nothing is imported from the source tree.
    return subprocess.run(list(cmd), cwd=venv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_operator_image_install_runs_its_entrypoint_without_jax(tmp_path: Path) -> None:
    venv = install_like_the_dockerfile("operator", tmp_path, [])
    proc = run_in(venv, *ENTRYPOINTS["operator"], "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--namespace" in proc.stdout
    assert run_in(venv, "python", "-c", "import kopf, kubernetes").returncode == 0
    no_jax = run_in(venv, "python", "-c", "import jax")
    assert no_jax.returncode != 0 and "No module named 'jax'" in no_jax.stderr


@pytest.mark.slow
def test_trainer_image_install_runs_its_entrypoint(tmp_path: Path) -> None:
    args = {
        c.value[0].split("=")[0]: c.value[0].split("=", 1)[1]
        for c in parse("trainer")
        if c.cmd == "ARG" and "=" in c.value[0]
    }
    # The cpu variant: the only one whose JAX runs here; tpu/cuda12 differ in one wheel each.
    jax = f"jax[cpu]=={args['JAX_VERSION']}"
    venv = install_like_the_dockerfile("trainer", tmp_path, [jax])
    proc = run_in(venv, *ENTRYPOINTS["trainer"], "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--recipe" in proc.stdout
    # --help stops before the training stack loads: import it, and run JAX once.
    stack = (
        "import jax, jax.numpy as jnp, posttrain.trainer.loop, posttrain.trainer.models;"
        "print(jax.default_backend(), int(jnp.arange(4).sum()))"
    )
    proc = run_in(venv, "python", "-c", stack)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["cpu", "6"]
    assert run_in(venv, "python", "-c", "import kopf").returncode != 0, "kopf in the trainer"
