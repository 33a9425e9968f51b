"""The built wheel works outside the checkout: presets inside it, a real search from it.

The wheel is built from a copy of the checkout (a stale ``build/`` folder cannot
leak files into it), installed without network into a fresh virtual environment
that borrows this interpreter's installed dependencies through a ``.pth`` file,
and run from a temporary folder with ``PYTHONPATH`` unset.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

# the wheel is built without network (--no-build-isolation): by the setuptools of this interpreter
pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in the test interpreter")

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
_SKIP_DIRS = {".git", ".venv", "build", "dist", "studies", "__pycache__", ".pytest_cache", ".ruff_cache", ".cache"}


def _checkout_files() -> list[str]:
    """Files of the checkout relative to ROOT: tracked and untracked, less git's ignored ones."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout.decode()
        return [f for f in out.split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # no git: a plain copy of the tree
        files = []
        for d, dirs, names in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in _SKIP_DIRS and not x.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(d, n), ROOT) for n in names]
        return files


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1", **extra)
    env.pop("PIP_FIND_LINKS", None)
    return env


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    r = subprocess.run(cmd, check=False, cwd=cwd, env=env or _clean_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _fresh_venv(where: Path, wheel: Path) -> Path:
    """A virtual environment holding ``wheel``; its dependencies come from this interpreter's site-packages."""
    venv.EnvBuilder(with_pip=False).create(where)
    py = where / "bin" / "python"
    # this pip installs into the new interpreter (--python) before that one can see the borrowed
    # site-packages, so pip never meets the editable autosearch installed there
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=where)
    own = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=where).strip())
    # the running interpreter's site-packages (with a base's, for a venv with system site-packages)
    deps = [d for d in dict.fromkeys([*(sysconfig.get_paths()[k] for k in ("purelib", "platlib")), *site.getsitepackages()])
            if Path(d).is_dir()]
    (own / "zz_borrowed_deps.pth").write_text("".join(f"{d}\n" for d in deps))  # appended after the venv's own
    return py


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("src") / "autosearch-src"
    for rel in _checkout_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    return dst


@pytest.fixture(scope="module")
def wheel(source_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), "."],
         cwd=source_copy)
    (whl,) = out.glob("autosearch-*.whl")
    return whl


def test_wheel_holds_presets_and_every_module(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert PRESETS == ["cnn.yaml", "quant.yaml", "transformer.yaml"]
    missing = [p for p in PRESETS if f"autosearch/search_spaces/{p}" not in names]
    assert not missing, f"presets not in the wheel: {missing} (pyproject.toml package-data of autosearch.search_spaces)"
    with zipfile.ZipFile(wheel) as z:
        for p in PRESETS:
            assert z.read(f"autosearch/search_spaces/{p}") == (ROOT / "search_spaces" / p).read_bytes()
    # packages are listed by hand in pyproject.toml: a new subpackage must not be left out
    modules = {f for f in _checkout_files() if f.startswith("autosearch/") and f.endswith(".py")}
    assert not modules - names, f"modules not in the wheel (add their package to [tool.setuptools] packages): {sorted(modules - names)}"
    assert not any(n.startswith(("search_spaces/", "tests/")) for n in names), "stray top-level packages in the wheel"


def test_editable_install_maps_the_presets(source_copy: Path, tmp_path: Path):
    """setuptools' editable finder resolves autosearch.search_spaces to the top-level folder."""
    wdir = tmp_path / "editable"
    code = "import setuptools.build_meta as b, sys; print(b.build_editable(sys.argv[1]))"
    _run([sys.executable, "-c", code, str(wdir)], cwd=source_copy)
    (whl,) = wdir.glob("autosearch-*.whl")
    py = _fresh_venv(tmp_path / "venv", whl)
    probe = ("import importlib.resources as r, json, autosearch\n"
             "print(json.dumps([autosearch.__file__, str(r.files('autosearch.search_spaces') / 'cnn.yaml')]))")
    work = tmp_path / "elsewhere"
    work.mkdir()
    init, cnn = json.loads(_run([str(py), "-c", probe], cwd=work).strip().splitlines()[-1])
    assert Path(init) == source_copy / "autosearch" / "__init__.py"
    assert Path(cnn) == source_copy / "search_spaces" / "cnn.yaml"


_SEARCH = textwrap.dedent("""
    import json, autosearch
    from autosearch.presets import preset_names, preset_path
    from autosearch.target import Target
    from autosearch.zoo import load_digits_data, pretrained_digits_cnn

    data = load_digits_data()
    model = pretrained_digits_cnn(epochs=4, widths=(8, 16, 16), verbose=False)  # trained and cached by the test process
    ev = autosearch.LabelledEvaluator(data.x_test, data.y_test, calibration=data.x_train[:256])
    target = Target(threads=1, warmup=3, min_runs=20, max_runs=200, max_seconds=0.3, lock_path="studies/.lock")
    autosearch.search(model, ev, example_inputs=data.x_test[:1], n_trials=2, study_name="wheel",
                      studies_dir="studies", target=target, verbose=False)   # no space given: the default, cnn
    print(json.dumps({"file": autosearch.__file__, "presets": preset_names(), "cnn": str(preset_path("cnn"))}))
""")


def _finished(db: Path, study: str) -> tuple[int, str]:
    """(finished trials, search-space name) of a study, read by this process."""
    import optuna

    ost = optuna.load_study(study_name=study, storage=f"sqlite:///{db}")
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in ost.trials)
    return done, ost.user_attrs["autosearch"]["space"]["name"]


def test_wheel_searches_outside_the_checkout(wheel: Path, small_cnn, cache_dir: Path, tmp_path: Path):
    """A 2-trial search with the default space, run by the installed wheel from a folder outside the checkout.

    The model is the digits ResNet of the tests (seconds to train, cached in ``cache_dir`` by the
    ``small_cnn`` fixture); ``test_wheel_demo`` runs the default model, which takes minutes to train.
    """
    py = _fresh_venv(tmp_path / "venv", wheel)
    work = tmp_path / "work"
    work.mkdir()
    env = _clean_env(AUTOSEARCH_CACHE=str(cache_dir))
    res = json.loads(_run([str(py), "-c", _SEARCH], cwd=work, env=env).strip().splitlines()[-1])
    venv_dir = (tmp_path / "venv").resolve()
    assert Path(res["file"]).resolve().is_relative_to(venv_dir), f"autosearch imported from {res['file']}, not the wheel"
    assert Path(res["cnn"]).resolve().is_relative_to(venv_dir), f"presets read from {res['cnn']}, not the wheel"
    assert res["presets"] == ["cnn", "quant", "transformer"]
    assert _finished(work / "studies" / "wheel.db", "wheel") == (2, "cnn")
    # the wheel's console script reads the same study
    front = _run([str(tmp_path / "venv" / "bin" / "autosearch"), "front", "wheel", "--all"], cwd=work, env=env)
    assert front.count("COMPLETE") == 2, front


@pytest.mark.slow
def test_wheel_demo(wheel: Path, cache_dir: Path, tmp_path: Path):
    """``autosearch demo`` from the wheel, outside the checkout: the default digits CNN and the default space.

    Slow: the default model (widths 32/64/128, 12 epochs) trains on first use, minutes on two cores.
    """
    py = _fresh_venv(tmp_path / "venv", wheel)
    work = tmp_path / "work"
    work.mkdir()
    env = _clean_env(AUTOSEARCH_CACHE=str(cache_dir))
    out = _run([str(py.parent / "autosearch"), "demo", "--n-trials", "2", "--no-analysis", "--study", "demo"],
               cwd=work, env=env, timeout=1800)
    assert _finished(work / "studies" / "demo.db", "demo") == (2, "cnn"), out
