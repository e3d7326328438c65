"""A normal (non-editable) install ships kernels/ as `fasttrdpo.kernels` and csrc/ as `fasttrdpo.csrc`,
and installs no top-level module named `kernels` (that name belongs to another PyPI package)."""
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_FILES = sorted(f for f in os.listdir(os.path.join(REPO, "kernels")) if f.endswith(".py"))
CSRC_FILES = sorted(f for f in os.listdir(os.path.join(REPO, "csrc")) if f.endswith((".cpp", ".h")))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), REPO], check=True, cwd=str(out))
    (whl,) = [p for p in out.iterdir() if p.suffix == ".whl"]
    return whl


def test_wheel_maps_kernels_and_csrc_under_fasttrdpo(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in KERNEL_FILES:
        assert f"fasttrdpo/kernels/{f}" in names
    for f in CSRC_FILES:
        assert f"fasttrdpo/csrc/{f}" in names
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"fasttrdpo"}, top_level


def test_installed_copy_imports_kernels_and_finds_csrc(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True)
    code = (
        "import fasttrdpo, fasttrdpo.kernels.token_logprobs, fasttrdpo.kernels.linear_logprobs, "
        "fasttrdpo.kernels.blend, fasttrdpo._cpp as c, importlib.util as u\n"
        "print(fasttrdpo.__file__); print(c.source_dir()); print(u.find_spec('kernels'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)  # the installed copy first; cwd is not the repo
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=str(tmp_path), env=env).stdout.split("\n")
    assert out[0].startswith(str(target)), out
    assert out[1].startswith(str(target)) and all((target / "fasttrdpo" / "csrc" / f).exists() for f in CSRC_FILES)
    # no top-level `kernels` from this install (the environment may hold the PyPI package of that name:
    # transformers >= 5.25 requires it)
    assert not (target / "kernels").exists()
    assert out[2] == "None" or str(target) not in out[2], f"a top-level `kernels` comes from this install: {out[2]}"


def test_from_a_checkout_import_kernels_reaches_the_installed_package_of_that_name(tmp_path):
    """From the repository root (`python -m` / `-c` put it first on sys.path) `import kernels` would find this
    repo's kernels/ folder instead of the PyPI `kernels` package, which transformers >= 5.25 imports when it loads
    a model class (`from kernels import ...`: ImportError, every model load failed from a checkout). The folder's
    __init__ hands the top-level name over to an installed package; fasttrdpo.kernels is unaffected."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MARK = 'the installed kernels package'\n")
    (other / "layers.py").write_text("VALUE = 7\n")
    code = ("import kernels, kernels.layers, fasttrdpo.kernels.token_logprobs as t\n"
            "print(kernels.MARK); print(kernels.layers.VALUE); print(t.__name__)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO,
                         env=env).stdout.split("\n")
    assert out[:3] == ["the installed kernels package", "7", "fasttrdpo.kernels.token_logprobs"], out
    # without another package of that name, `import kernels` from the root still finds the folder, harmlessly
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"], check=True,
                         capture_output=True, text=True, cwd=REPO, env=env).stdout.strip()
    assert out == os.path.join(REPO, "kernels", "__init__.py") or "site-packages" in out, out
