"""FID / FVD machinery: the Fréchet distance against the scipy-sqrtm formula, float64 statistics, OpenDWM's frame and
clip selection, FVD's resize against torch, and the eval_dit command end to end (tiny DiT, real I3D weights)."""
import json
import os

import numpy as np
import pytest
from scipy import linalg

from cvd_storm_jax import video_metrics as vm


def _scipy_frechet(mu1, s1, mu2, s2):
  """The textbook formula as pytorch-fid writes it: scipy's sqrtm of S1 S2, real part."""
  covmean = linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_and_is_zero_for_identical_sets():
  rng = np.random.default_rng(0)
  d = 24
  a = rng.standard_normal((400, d)) @ rng.standard_normal((d, d))
  b = 0.8 * rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) + 0.5
  sa, sb = vm.FeatureStats(d).update(a), vm.FeatureStats(d).update(b)
  mu_a, cov_a = sa.mean_cov()
  mu_b, cov_b = sb.mean_cov()
  np.testing.assert_allclose(mu_a, a.mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov_a, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-9)
  ours, ref = vm.frechet_distance(mu_a, cov_a, mu_b, cov_b), _scipy_frechet(mu_a, cov_a, mu_b, cov_b)
  assert ours > 1.0
  np.testing.assert_allclose(ours, ref, rtol=1e-8)
  assert abs(vm.distance(sa, sa)) < 1e-8 * np.trace(cov_a)
  # Symmetric in its arguments.
  np.testing.assert_allclose(vm.distance(sb, sa), ours, rtol=1e-8)
  # Fewer samples than dimensions (rank-deficient covariances, as with small evaluation sets): finite and >= 0.
  few_a, few_b = vm.FeatureStats(d).update(a[:10]), vm.FeatureStats(d).update(a[10:20])
  small = vm.distance(few_a, few_b)
  assert np.isfinite(small) and small > 0
  with pytest.raises(ValueError, match="shape mismatch"):
    vm.frechet_distance(mu_a, cov_a, mu_b[:3], cov_b)


def test_feature_stats_accumulate_merge_save_and_refuse_bad_input(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((50, 5)).astype(np.float32) * 100 + 1e4  # a large offset: float64 accumulation matters
  whole = vm.FeatureStats(5).update(x)
  parts = vm.FeatureStats(5).update(x[:13]).merged(vm.FeatureStats(5).update(x[13:]))
  assert parts.count == whole.count == 50
  np.testing.assert_allclose(parts.mean_cov()[1], np.cov(x.astype(np.float64), rowvar=False), rtol=1e-8)
  np.testing.assert_allclose(parts.mean_cov()[0], whole.mean_cov()[0], rtol=1e-12)
  assert whole.all_processes() is whole  # one process
  whole.protocol = {"metric": "fvd", "first_frame": 3}
  whole.save(str(tmp_path / "s.npz"))
  back = vm.FeatureStats.load(str(tmp_path / "s.npz"))
  assert back.count == 50 and back.protocol == whole.protocol
  np.testing.assert_array_equal(back.outer, whole.outer)
  with pytest.raises(ValueError, match=r"expected \[N, 5\]"):
    whole.update(np.zeros((3, 4)))
  with pytest.raises(ValueError, match="1 of 2 feature vectors are not finite"):
    whole.update(np.array([[0, 0, 0, 0, np.nan], [0, 0, 0, 0, 0]]))
  with pytest.raises(ValueError, match="at least 2"):
    vm.FeatureStats(5).update(x[:1]).mean_cov()
  with pytest.raises(ValueError, match="cannot merge"):
    whole.merged(vm.FeatureStats(4))


def test_all_processes_sums_exactly_through_int32(monkeypatch):
  """Two processes, simulated: every process's sums arrive bit-exact (JAX would round float64 to float32) and add."""
  import jax
  from jax.experimental import multihost_utils
  seen = []

  def fake_allgather(x):
    seen.append(np.asarray(x).dtype)
    return np.stack([np.asarray(x), np.asarray(x)])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", fake_allgather)
  x = np.random.default_rng(3).standard_normal((7, 3)) * 1e6 + 1e-6
  one = vm.FeatureStats(3).update(x)
  both = one.all_processes()
  assert set(seen) == {np.dtype(np.int32)}
  assert both.count == 14
  np.testing.assert_array_equal(both.total, 2 * one.total)
  np.testing.assert_array_equal(both.outer, 2 * one.outer)


def test_frame_and_clip_selection_follow_views_and_masks():
  B, T, V, H, W = 2, 12, 3, 4, 5
  video = np.arange(B * T * V * H * W * 3, dtype=np.int64).reshape(B, T, V, H, W, 3)
  mask = np.array([[True, False, True], [True, True, False]])
  frames = vm.fid_frames(video, mask, 2, 7)
  want = [video[b, t, v] for b in range(B) for v in range(V) if mask[b, v] for t in range(2, 7)]
  np.testing.assert_array_equal(frames, np.stack(want))
  clips = vm.fvd_clips(video, mask, 3, 9)
  want = [video[b, 3:12, v] for b in range(B) for v in range(V) if mask[b, v]]
  np.testing.assert_array_equal(clips, np.stack(want))
  with pytest.raises(ValueError, match=">= 9 frames"):
    vm.fvd_clips(video, mask, 0, 8)
  with pytest.raises(ValueError, match=r"\[4, 13\) are outside the clip's 12 frames"):
    vm.fvd_clips(video, mask, 4, 9)


def test_fvd_resize_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  for h, w in ((256, 448), (64, 112)):  # down- and up-sampling
    clips = rng.integers(0, 256, (1, 2, h, w, 3), dtype=np.uint8)
    ours = np.asarray(vm.resize_for_fvd(clips))
    t = torch.from_numpy(clips.astype(np.float32)).reshape(2, h, w, 3).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear", align_corners=False)
    ref = (ref.permute(0, 2, 3, 1).numpy() / 127.5 - 1.0).reshape(1, 2, 224, 224, 3)
    np.testing.assert_allclose(ours, ref, atol=2e-6)


def _tiny_eval_config():
  """The small DiT on single-view 12-frame clips: 2 ground-truth reference frames + 10 evaluated frames (the FVD
  minimum of OpenDWM), so that the feature networks see few images."""
  from _configs import small_dit_config
  c = small_dit_config()
  c.data.num_views, c.data.num_frames = 1, 12
  return c


def test_eval_dit_end_to_end(tmp_path):
  """Generation + FID (random-weight InceptionV3) + FVD (the real I3D weights) on the tiny DiT, the real-statistics
  reuse, and the request checks."""
  import jax
  import jax.numpy as jnp
  from flax.core import meta

  from _fid_weights import random_inception_weights
  from cvd_storm_jax import eval_dit, tasks
  from cvd_storm_jax.data_pipelines import pipeline
  c = _tiny_eval_config()
  task = tasks.get_task(c)
  batch = {k: jnp.asarray(v) for k, v in task.device_batch(next(pipeline.make_iterator(c.data, seed=0))).items()}
  params = meta.unbox(jax.jit(task.init)(jax.random.key(0), batch))
  inception = random_inception_weights(str(tmp_path))
  fid, fvd = vm.FIDFeatures(inception, batch_size=10), vm.FVDFeatures(batch_size=2)
  kw = dict(num_batches=2, num_steps=2, guidance=2.0, reference_frames=2, fvd_frames=10, params=params,
            fid_features=fid, fvd_features=fvd)
  out = str(tmp_path / "eval")
  summary = eval_dit.evaluate(c, "init", out, **kw)
  # 2 batches x 1 clip x 1 view: 20 evaluated frames for FID, 2 videos for FVD, on each side.
  assert (summary["fid_generated_count"], summary["fid_real_count"]) == (20, 20)
  assert (summary["fvd_generated_count"], summary["fvd_real_count"]) == (2, 2)
  real_fvd = vm.FeatureStats.load(os.path.join(out, "real_fvd.npz"))
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f)["fvd"] == pytest.approx(summary["fvd"])
  # The real side equals the features of the data's own frames, selected as the protocol says.
  it = pipeline.make_iterator(c.data, seed=c.seed)
  clips = np.concatenate([vm.fvd_clips(next(it)["images"], np.ones((1, 1), bool), 2, 10) for _ in range(4)])
  feats = fvd(clips)
  np.testing.assert_allclose(real_fvd.total, feats[:2].astype(np.float64).sum(0), rtol=1e-5)
  # An untrained model's video is noise: much farther from the data than two other clips of the data are.
  other = vm.distance(real_fvd, vm.FeatureStats(vm.FVD_DIM).update(feats[2:]))
  print(f"FVD generated {summary['fvd']:.1f}, other real clips {other:.1f}; FID generated {summary['fid']:.3f}")
  assert summary["fvd"] > 3 * other
  # Reusing the real statistics gives the same numbers without recomputing them.
  again = eval_dit.evaluate(c, "init", str(tmp_path / "again"), real_stats=out, **dict(kw, metrics=["fvd"]))
  assert again["fvd"] == pytest.approx(summary["fvd"], rel=1e-6) and "fid" not in again
  # A multi-bucket (training) data config is evaluated at its largest bucket only: here the one of the first run.
  multi = c.copy_and_resolve_references()
  multi.data.buckets = [(16, 32, 0.7), tuple(c.data.buckets[0][:2]) + (0.3,)]
  again = eval_dit.evaluate(multi, "init", str(tmp_path / "multi"), real_stats=out, **dict(kw, metrics=["fvd"]))
  assert again["fvd"] == pytest.approx(summary["fvd"], rel=1e-6)
  with pytest.raises(ValueError, match="was computed with protocol"):
    eval_dit.evaluate(c, "init", str(tmp_path / "x"), real_stats=out, **dict(kw, reference_frames=1))
  with pytest.raises(ValueError, match="was computed with protocol"):  # other clips: fewer batches
    eval_dit.evaluate(c, "init", str(tmp_path / "x"), real_stats=out, **dict(kw, num_batches=1))
  with pytest.raises(ValueError, match="FVD needs 16 evaluated frames after the first 2"):
    eval_dit.evaluate(c, "init", str(tmp_path / "x"), **dict(kw, fvd_frames=16))
  with pytest.raises(ValueError, match="FID needs --inception_weights"):
    eval_dit.evaluate(c, "init", str(tmp_path / "x"), **dict(kw, fid_features=None))
  with pytest.raises(ValueError, match="choose from fid,fvd"):
    eval_dit.evaluate(c, "init", str(tmp_path / "x"), **dict(kw, metrics=["kid"]))
