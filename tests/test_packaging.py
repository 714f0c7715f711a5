"""The distribution builds, and its wheel installs and works in a fresh virtual environment.

Slow (about half a minute): run by ``make test-wheel`` (and so by ``.ci/run``) and
``make test-slow``. The fresh environment gets only the wheel (``pip install --no-deps
--no-index``); torch, torchdyn and the other dependencies are not downloaded again but
exposed from the running environment's site-packages by a ``.pth`` file, which only
appends that directory to ``sys.path`` (its own ``.pth`` files, such as the editable
install of this checkout, are not processed there), so the import resolves to the wheel.
"""

import os
import pathlib
import subprocess
import sys
import sysconfig
import time
import zipfile

import pytest

import torchdyn_hypersolvers

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMOKE = """
import importlib.metadata, pathlib, sys
import torch
from torchdyn.core import NeuralODE
import torchdyn_hypersolvers as th
assert pathlib.Path(th.__file__).resolve().is_relative_to(pathlib.Path(sys.prefix).resolve()), th.__file__
assert importlib.metadata.version("torchdyn-hypersolvers") == th.__version__
hs = th.HyperEuler(th.MLPHyperNet(2))
f = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
_, traj = NeuralODE(f, solver=hs)(torch.randn(4, 2), torch.linspace(0, 1, 5))
assert traj.shape == (5, 4, 2) and torch.isfinite(traj).all()
th.save(hs, "hs.pt")
assert torch.equal(th.load("hs.pt", base="euler").solve(lambda t, z: f(z), traj[0], torch.linspace(0, 1, 5)), traj)
print("ok", th.__version__, th.__file__)
"""


def _run(*args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_wheel_installs_and_works_in_a_fresh_venv(tmp_path):
    start = time.perf_counter()
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT), cwd=tmp_path)
    version = torchdyn_hypersolvers.__version__
    wheel = dist / f"torchdyn_hypersolvers-{version}-py3-none-any.whl"
    assert wheel.exists() and (dist / f"torchdyn_hypersolvers-{version}.tar.gz").exists(), os.listdir(dist)

    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"torchdyn_hypersolvers", f"torchdyn_hypersolvers-{version}.dist-info"}, sorted(tops)
    for module in ("__init__", "io", "lightning", "validity", "solvers", "fit"):
        assert f"torchdyn_hypersolvers/{module}.py" in names
    metadata = zipfile.ZipFile(wheel).read(f"torchdyn_hypersolvers-{version}.dist-info/METADATA").decode()
    assert f"Version: {version}" in metadata and "Provides-Extra: lightning" in metadata

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel))
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    (pathlib.Path(site) / "_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    work = tmp_path / "work"  # not the checkout: nothing can be imported from the source tree
    work.mkdir()
    smoke = _run(python, "-c", SMOKE, cwd=work, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert smoke.stdout.splitlines()[-1].startswith(f"ok {version} {site}"), smoke.stdout
    assert time.perf_counter() - start < 120
