"""The package as a user gets it: the folder mapping, wheel installs, and an oracle free of torch."""

import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"reflora": "reflora", "reflora.backends": "backends", "reflora.conformance": "conformance"}


def _source_packages() -> set[str]:
    """Every importable package name the source tree holds, by the folder mapping."""
    found = set()
    for name, folder in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_source_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert _source_packages() <= listed, f"missing from pyproject: {_source_packages() - listed}"
    assert config["tool"]["setuptools"]["package-dir"] == MAPPING


def _oracle_modules() -> list[str]:
    import reflora

    return [
        m.name
        for m in pkgutil.walk_packages(reflora.__path__, "reflora.")
        if not m.name.startswith(("reflora.backends", "reflora.conformance")) and m.name != "reflora.__main__"
    ]


def test_the_oracle_never_imports_torch():
    modules = _oracle_modules()
    assert "reflora.nf4" in modules and "reflora.formats" in modules
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_a_wheel_install_works_like_the_editable_one(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("reflora-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    names = sorted(_source_packages())
    code = (
        "import importlib, sys\n"
        f"mods = [importlib.import_module(n) for n in {names!r}]\n"
        "print(all(m.__file__.startswith(sys.argv[1]) for m in mods))"
    )
    # -I: isolated mode, so neither the editable install nor the source tree can answer the imports
    env_path = [str(target)] + [p for p in sys.path if "site-packages" in p]
    code = f"import sys; sys.path[:0] = {env_path!r}\n" + code
    out = subprocess.run(
        [sys.executable, "-I", "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    # data files travel too: each backend's known-deviations file
    shipped = {p.name for p in (target / "reflora" / "backends" / "deviations").glob("*.toml")}
    assert shipped == {p.name for p in (ROOT / "backends" / "deviations").glob("*.toml")} != set()
