"""constraints.txt, the tested versions behind pyproject.toml's ranges: complete, consistent
with the ranges, and used by every install path (scripts/install.sh, so make and .ci/run;
cluster/Dockerfile; the ray up setup commands)."""

import importlib.metadata as metadata
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; pytest depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
# Left to the machine on purpose: CPU machines take the CPU wheel, GPU ones their CUDA build.
UNPINNED = {"torch", "spatialrl"}


def pins() -> dict[str, Version]:
    pinned = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"not an exact pin: {line!r}"
        key = canonicalize_name(name)
        assert key not in pinned, f"pinned twice: {name}"
        pinned[key] = Version(version)
    return pinned


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [Requirement(r) for r in listed]


def test_every_direct_dependency_is_pinned_inside_its_range():
    pinned = pins()
    assert not UNPINNED & set(pinned), "torch and spatialrl must stay out of constraints.txt"
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name in UNPINNED:
            continue
        assert name in pinned, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pinned[name]} outside pyproject's {req}")


def test_pins_are_closed_and_consistent_with_each_other():
    """Every dependency of a pinned package (as its installed metadata states, on this
    Python) is pinned too, at a version its requirement accepts: pip never has to choose."""
    pinned = pins()
    todo = [(r, ()) for r in project_requirements()]
    seen = set()
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, tuple(sorted(req.extras)))
        if name in UNPINNED or key in seen:
            continue
        seen.add(key)
        assert name in pinned, f"{req} (needed by the project) is not pinned"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{name}=={pinned[name]} does not satisfy {req}")
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is pinned but not installed here")
        for text in dist.requires or []:
            sub = Requirement(text)
            environments = [{"extra": extra} for extra in (req.extras or {""})]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in environments):
                todo.append((sub, ()))
    assert len(seen) > 50  # the walk really went through the tree


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A VENV whose python logs its arguments and succeeds (torch 'importable')."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    python.chmod(0o755)
    return venv, log


def install(venv: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([REPO / "scripts" / "install.sh"], capture_output=True, text=True,
                          env={**os.environ, "VENV": str(venv), **env}, timeout=60)


def test_install_script_installs_with_the_constraints_and_reruns_when_they_change(tmp_path):
    venv, log = fake_venv(tmp_path)
    assert install(venv).returncode == 0
    pip_calls = [line for line in log.read_text().splitlines() if "pip" in line]
    assert pip_calls == ["-m pip --disable-pip-version-check -q install -c constraints.txt "
                         "-e .[dev]"]
    stamp = venv / ".spatialrl-installed"
    assert stamp.is_file()

    log.unlink()  # installed and nothing changed: a rerun does nothing
    assert install(venv).returncode == 0 and not log.exists()

    # constraints.txt newer than the last install (as after regenerating it): install again
    os.utime(stamp, (CONSTRAINTS.stat().st_mtime - 10,) * 2)
    assert install(venv).returncode == 0
    assert "-c constraints.txt" in log.read_text()


def test_install_script_can_opt_out_of_the_constraints(tmp_path):
    venv, log = fake_venv(tmp_path)
    assert install(venv, SPATIALRL_CONSTRAINTS="").returncode == 0
    assert "-m pip --disable-pip-version-check -q install -e .[dev]" in log.read_text()
    assert "constraints" not in log.read_text()


def test_image_and_ray_up_clusters_install_with_the_constraints():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert re.search(r"pip install [^\n]*-c constraints\.txt \.", dockerfile)
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M)
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    assert pins()["ray"] == Version(ray_version), "the image's Ray must be the pinned Ray"
    for cluster in ("aws.yaml", "gcp.yaml"):
        commands = yaml.safe_load((REPO / "cluster" / cluster).read_text())["setup_commands"]
        assert any("-c /home/ray/spatialrl/constraints.txt" in c for c in commands), cluster
    assert "make test" in (REPO / ".ci" / "run").read_text()  # CI installs through install.sh
