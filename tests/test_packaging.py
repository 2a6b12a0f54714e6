"""Packaging a cluster can install: ranges in pyproject, exact pins only in constraints.txt, one dependency list,
and a wheel that carries its recipes and a `vocseg` console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def read_requirements(path: Path) -> dict[str, Requirement]:
    """Requirement lines of a requirements / constraints file (comments and -r/-c includes skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    requirements = [Requirement(line) for line in lines if line and not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in requirements}


def flattened_extra(name: str) -> dict[str, Requirement]:
    """An extra's requirements, with vocseg[other,extras] references expanded."""
    out = {}
    for line in PYPROJECT["project"]["optional-dependencies"][name]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == "vocseg":
            for extra in requirement.extras:
                out.update(flattened_extra(extra))
        else:
            out[canonicalize_name(requirement.name)] = requirement
    return out


def test_dependencies_are_ranges_and_requirements_txt_is_the_same_list():
    declared = {canonicalize_name(Requirement(line).name): Requirement(line)
                for line in PYPROJECT["project"]["dependencies"]}
    for name in ("torch", "transformers", "accelerate", "datasets", "clearml", "albumentations", "pyarrow",
                 "huggingface-hub", "opencv-python-headless", "scipy", "safetensors"):
        assert name in declared, f"{name} is imported by vocseg but not declared"
    pinned = [str(r) for r in declared.values() if any(s.operator == "==" for s in r.specifier)]
    assert not pinned, f"exact pins in [project] dependencies replace a cluster's own builds: {pinned}"
    assert {n: str(r.specifier) for n, r in read_requirements(REPO / "requirements.txt").items()} == {
        n: str(r.specifier) for n, r in declared.items()}
    assert {n: str(r.specifier) for n, r in read_requirements(REPO / "requirements-test.txt").items()} == {
        n: str(r.specifier) for n, r in flattened_extra("test").items()}


def test_constraints_pin_every_requirement_inside_its_range():
    pins = read_requirements(REPO / "constraints.txt")
    wanted = {**read_requirements(REPO / "requirements.txt"), **read_requirements(REPO / "requirements-test.txt")}
    for name, requirement in wanted.items():
        assert name in pins, f"constraints.txt does not pin {name}"
        [pin] = pins[name].specifier
        assert pin.operator == "==", f"constraints.txt: {pins[name]} is not an exact pin"
        assert requirement.specifier.contains(pin.version, prereleases=True), \
            f"constraints.txt pins {name}=={pin.version}, outside the declared {requirement}"


def test_every_subpackage_is_packaged():
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vocseg").rglob("__init__.py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


def test_wheel_carries_recipes_and_console_script(tmp_path):
    """Build the wheel (from a copy: the build writes build/ and egg-info next to the sources; no network: this
    environment's setuptools), unpack it away from the checkout and use it."""
    source = tmp_path / "source"
    for name in ("vocseg", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, cwd=tmp_path)
    [wheel] = (tmp_path / "dist").glob("vocseg-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        assert "vocseg = vocseg.__main__:main" in archive.read(entry_points).decode()
    assert sorted(p.name for p in (site / "vocseg" / "configs").glob("*.yaml")) == sorted(
        p.name for p in (REPO / "configs").glob("*.yaml"))
    check = ("from vocseg.config import CONFIGS_DIR, parse_config; from vocseg.__main__ import main; "
             "import sys; print(CONFIGS_DIR); print(parse_config([]).recipe); "
             "print(parse_config(['--config', 'segformer_b2_voc_aug']).model); sys.argv = ['vocseg', '--help']; "
             "sys.exit(main())")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    configs_dir, recipe, model, *usage = result.stdout.splitlines()
    assert Path(configs_dir) == site / "vocseg" / "configs"
    assert (recipe, model) == ("demo", "segformer-b2")
    assert any(line.split()[:1] == ["train"] for line in usage), usage
