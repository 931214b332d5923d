"""3DGS .ply export of STORM-VAE Gaussians: standard layout, exact round trip, clear errors."""
import numpy as np
import pytest

from cvd_storm_jax.eval_storm import PLY_PROPERTIES, SH_C0, export_ply, read_ply


def _gaussians(n=257, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(n, 4)).astype(np.float32)
  return {
      "means": rng.normal(size=(n, 3)).astype(np.float32) * 10,
      "scales": np.exp(rng.normal(size=(n, 3)) - 2).astype(np.float32),
      "quats": q / np.linalg.norm(q, axis=-1, keepdims=True),
      "opacities": rng.uniform(0.01, 0.99, size=(n,)).astype(np.float32),
      "colors": rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),  # the GS decoder's [-1, 1] space
      "velocities": rng.normal(size=(n, 3)).astype(np.float32),  # extra keys are ignored
  }


def test_round_trip(tmp_path):
  g = _gaussians()
  path = str(tmp_path / "scene.ply")
  assert export_ply(g, path) == len(g["means"])
  back = read_ply(path)
  np.testing.assert_allclose(back["means"], g["means"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(back["scales"], g["scales"], rtol=1e-5)
  np.testing.assert_allclose(back["quats"], g["quats"], atol=1e-6)
  np.testing.assert_allclose(back["opacities"], g["opacities"], atol=1e-5)
  np.testing.assert_allclose(back["colors"], g["colors"] * 0.5 + 0.5, atol=1e-5)
  # The standard 3DGS fields, in the standard order, with the documented encodings.
  assert tuple(back["properties"]) == PLY_PROPERTIES
  np.testing.assert_allclose(back["properties"]["f_dc_0"], (g["colors"][:, 0] * 0.5 + 0.5 - 0.5) / SH_C0, atol=1e-5)
  p = g["opacities"].astype(np.float64)
  np.testing.assert_allclose(back["properties"]["opacity"], np.log(p / (1 - p)), atol=1e-4)
  np.testing.assert_allclose(back["properties"]["scale_1"], np.log(g["scales"][:, 1]), atol=1e-5)
  with open(path, "rb") as f:
    head = f.read(200).decode("ascii", errors="replace")
  assert head.startswith("ply\nformat binary_little_endian 1.0\nelement vertex 257\nproperty float x\n")


def test_unit_colors_unnormalised_quats_and_opacity_filter(tmp_path):
  g = _gaussians(10)
  g["colors"] = (g["colors"] * 0.5 + 0.5)
  g["quats"] = g["quats"] * 3.0  # not unit: normalised on export
  g["opacities"][[2, 5]] = 0.0  # e.g. padded views: dropped
  path = str(tmp_path / "s.ply")
  assert export_ply(g, path, colors_in="unit") == 8
  back = read_ply(path)
  keep = np.ones(10, bool)
  keep[[2, 5]] = False
  np.testing.assert_allclose(back["colors"], g["colors"][keep], atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(back["quats"], axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(back["means"], g["means"][keep], atol=1e-6)


def test_errors(tmp_path):
  g = _gaussians(4)
  with pytest.raises(ValueError, match="colors_in"):
    export_ply(g, str(tmp_path / "a.ply"), colors_in="srgb")
  g["scales"][0, 0] = -1.0
  with pytest.raises(ValueError, match="scales must be positive"):
    export_ply(g, str(tmp_path / "a.ply"))
  bad = tmp_path / "bad.ply"
  bad.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n1\n")
  with pytest.raises(ValueError, match="binary_little_endian"):
    read_ply(str(bad))
  trunc = tmp_path / "trunc.ply"
  export_ply(_gaussians(4), str(trunc))
  trunc.write_bytes(trunc.read_bytes()[:-8])
  with pytest.raises(ValueError, match="truncated"):
    read_ply(str(trunc))
