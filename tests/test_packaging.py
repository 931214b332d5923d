"""The built wheel installs kernels/ and data_pipelines/ under cvd_storm_jax (their bare names are other PyPI
packages), and they import from the wheel, not from the source tree."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_layout_and_import(tmp_path):
  wheel_dir, target = tmp_path / "dist", tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  str(wheel_dir), REPO], check=True, capture_output=True, text=True, timeout=300)
  (wheel,) = glob.glob(str(wheel_dir / "cvd_storm_jax-*.whl"))
  names = zipfile.ZipFile(wheel).namelist()
  assert "cvd_storm_jax/kernels/__init__.py" in names
  assert "cvd_storm_jax/data_pipelines/schema.py" in names
  assert not any(n.startswith(("kernels/", "data_pipelines/")) for n in names), "bare top-level packages leaked"
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
                 check=True, capture_output=True, text=True, timeout=300)
  code = ("import cvd_storm_jax, cvd_storm_jax.kernels as k, cvd_storm_jax.data_pipelines.schema as s; "
          "print(cvd_storm_jax.__file__); print(k.__file__); print(s.__file__)")
  env = dict(os.environ, PYTHONPATH=str(target), PYTHONNOUSERSITE="1")
  # -S drops site-packages (and with it the editable install); the deps come back through a .pth-free path list.
  site_dirs = [p for p in sys.path if p.endswith("site-packages")]
  env["PYTHONPATH"] = os.pathsep.join([str(target)] + site_dirs)
  out = subprocess.run([sys.executable, "-S", "-c", code], cwd=str(tmp_path), env=env, check=True,
                       capture_output=True, text=True, timeout=120).stdout.split()
  assert all(path.startswith(str(target)) for path in out), out
