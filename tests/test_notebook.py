"""notebooks/quickstart.ipynb runs top to bottom (its quick mode: two training steps of small models on small clips)
and leaves what it promises: checkpoints, generated and predicted video, STORM-VAE renders and a readable .ply.

The notebook runs in a fresh Python process, as a kernel would: its own cwd, sys.path and matplotlib backend, one
CPU device, and XLA's backend optimisation off (every program here runs once or twice: compiling is the cost).
"""
import json
import os
import subprocess
import sys

from _configs import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")

# Executes the code cells in one namespace, then reports what the test checks (the namespace does not cross the
# process boundary).
_RUNNER = r"""
import json, sys
import numpy as np
nb = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
    exec(compile("".join(cell["source"]), f"{sys.argv[1]}:code cell {i}", "exec"), ns)
import jax.numpy as jnp
task, batch, host = ns["task"], ns["batch"], ns["host"]
generated, predicted = ns["generated"], ns["predicted"]
# The clip's own first frame through the latents and back: what video prediction must keep.
own = ns["decode_latents"](task, np.asarray(task._latents({}, {"images": jnp.asarray(batch["images"])}, None)))
ply = ns["read_ply"](ns["ply_path"])
print("RESULT " + json.dumps(dict(
    generated_shape=list(generated.shape), generated_dtype=str(generated.dtype),
    images_shape=list(host["images"].shape),
    predicted_first_err=int(np.abs(predicted[:, 0].astype(int) - own[:, 0].astype(int)).max()),
    generated_first_err=int(np.abs(generated[:, 0].astype(int) - own[:, 0].astype(int)).max()),
    ply_count=int(len(ply["means"])), written=int(ns["count"]), ply_finite=bool(np.isfinite(ply["means"]).all()),
    render_finite=bool(np.isfinite(ns["res"]["depth"]).all() and np.isfinite(ns["res"]["rgb01"]).all()))))
"""


def test_quickstart_notebook_runs(tmp_path):
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4
  assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), \
      "commit the notebook without outputs"
  env = dict(os.environ, MPLBACKEND="Agg", CVD_NOTEBOOK_QUICK="1", CVD_NOTEBOOK_WORKDIR=str(tmp_path),
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "-c", _RUNNER, NOTEBOOK], cwd=os.path.join(REPO, "notebooks"), env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert lines, proc.stdout[-2000:]
  r = json.loads(lines[-1][len("RESULT "):])
  assert r["generated_shape"] == r["images_shape"] and r["generated_dtype"] == "uint8"
  # Video prediction keeps the clip's own first frame (up to uint8 rounding); free generation does not.
  assert r["predicted_first_err"] <= 1
  assert r["generated_first_err"] > 10
  assert os.path.isdir(os.path.join(tmp_path, "dit", "checkpoints"))
  assert os.path.isdir(os.path.join(tmp_path, "storm_vae", "checkpoints"))
  assert r["ply_count"] == r["written"] > 0 and r["ply_finite"] and r["render_finite"]
