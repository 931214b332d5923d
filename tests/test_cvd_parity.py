"""CVDDiT parity with an independent PyTorch reference built from diffusers parts (fp32, random weights).

test_mmdit.py ties the MM-DiT backbone to diffusers; this file ties the CVD-specific additions of models/cvd_dit.py
(UniMLVG / OpenDWM ``DiTCrossviewTemporalConditionModel``, shared/reference/cvd_storm_official.md §1.2-1.5) to a
reference written here, so that a silent change in any of them shows up as a numeric mismatch:

- pointwise temporal blocks and row-wise cross-view blocks (LN -> GEGLU FF, LN -> RMS-qk-norm attention, LN -> FF),
  with the V x V adjacency mask (True = row view attends to column view; one sample has an asymmetric adjacency so
  that a transposed mask cannot pass);
- AlphaBlender gates, a = sigmoid(mix_factor), forced to 1 per sample by disable_temporal / disable_crossview;
- frame / view index embeddings (sinusoid + per-block MLP) and the 11-value camera embedding added before both kinds
  of block;
- the layout adapter: PixelUnshuffle(8) -> diffusers AdapterBlocks -> 1x1 projections, one residual per early layer.

The reference uses diffusers' SD3Transformer2DModel (its submodules, in a loop of our own so that blocks can be
inserted between the joint blocks), Attention, FeedForward, TimestepEmbedding and AdapterBlock, plus the glue below.
It is not OpenDWM's code. The backbone is imported through the repo's own path (save_pretrained -> import_into_cvd);
the added blocks are grafted by module structure, and the graft must fill exactly the params import_into_cvd leaves
fresh. Every weight is randomised (zero-initialised projections and mix factors included), so nothing is trivially
0 or 1.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers.models.adapter import AdapterBlock  # noqa: E402
from diffusers.models.attention import FeedForward  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding  # noqa: E402
from flax import traverse_util  # noqa: E402

from cvd_storm_jax.models.cvd_dit import CVDDiT, param_shapes_for  # noqa: E402
from cvd_storm_jax.pretrained.sd3_transformer import import_into_cvd  # noqa: E402

HEADS, HEAD_DIM = 2, 16
D = HEADS * HEAD_DIM
TL, CL = (1, 2), (0, 2)  # temporal blocks after layers 1 and 2, cross-view after 0 and 2
N_ADAPTER, DOWN = 2, 8
CAM = 11
SD3_CFG = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=HEAD_DIM,
               num_attention_heads=HEADS, joint_attention_dim=24, caption_projection_dim=D, pooled_projection_dim=20,
               pos_embed_max_size=10, dual_attention_layers=(0,), qk_norm="rms_norm")
MODEL_CFG = dict(SD3_CFG, temporal_layers=TL, temporal_attention_type="pointwise", crossview_layers=CL,
                 crossview_attention_type="rowwise", qk_norm_additional="rms_norm", merge_factor=2.0, camera_dim=CAM,
                 camera_on_temporal=True, num_adapter_blocks=N_ADAPTER, adapter_res_blocks=1, layout_channels=6,
                 layout_downscale=DOWN, remat_policy="none", attention_impl="xla", dtype="float32",
                 param_dtype="float32")
B, T, V, H, W, L = 2, 3, 4, 8, 12, 5  # 4x6 token grid per image
TOL = 1e-5  # max |jax - torch| / max |torch|; measured about 2e-6 (fp32 reassociation, XLA vs torch CPU)


def sinusoid(x, dim):
  # The repo's timestep_embedding convention (cos first, no frequency shift); diffusers' default shift is 1.
  return get_timestep_embedding(x.reshape(-1), dim, flip_sin_to_cos=True, downscale_freq_shift=0)


# ----------------------------------------------------------------------------------------------------------------------
# The PyTorch reference.
# ----------------------------------------------------------------------------------------------------------------------
class RefVTBlock(torch.nn.Module):
  """x += FF(LN(x)); x += Attn(LN(x), mask); x += FF(LN(x)); no timestep conditioning."""

  def __init__(self):
    super().__init__()
    self.norm_in, self.norm1, self.norm3 = (torch.nn.LayerNorm(D) for _ in range(3))
    self.ff_in, self.ff = (FeedForward(D, activation_fn="geglu") for _ in range(2))
    self.attn1 = Attention(D, heads=HEADS, dim_head=HEAD_DIM, qk_norm="rms_norm", eps=1e-5)

  def forward(self, x, mask=None):
    x = x + self.ff_in(self.norm_in(x))
    x = x + self.attn1(self.norm1(x), attention_mask=mask)
    return x + self.ff(self.norm3(x))


class RefMixLayer(torch.nn.Module):
  """Index embedding (+ camera) -> VTBlock over one axis -> AlphaBlender against the block's input."""

  def __init__(self):
    super().__init__()
    self.index_embed = TimestepEmbedding(D, 4 * D, out_dim=D)
    self.block = RefVTBlock()
    self.mix_factor = torch.nn.Parameter(torch.tensor([2.0]))

  def index(self, count):
    return self.index_embed(sinusoid(torch.arange(count, dtype=torch.float32), D))

  def blend(self, x, y, disable):
    a = torch.where(disable, torch.ones(()), torch.sigmoid(self.mix_factor)).view(-1, *[1] * (x.ndim - 1))
    return a * x + (1 - a) * y


class RefCVD(torch.nn.Module):
  """SD3 MM-DiT (diffusers) with the camera embedding, temporal / cross-view layers and layout adapter around it."""

  def __init__(self):
    super().__init__()
    self.sd3 = diffusers.SD3Transformer2DModel(**SD3_CFG)
    self.camera_embed = TimestepEmbedding(CAM * 256, D)
    self.temporal = torch.nn.ModuleList(RefMixLayer() for _ in TL)
    self.crossview = torch.nn.ModuleList(RefMixLayer() for _ in CL)
    cin = MODEL_CFG["layout_channels"] * DOWN * DOWN
    self.adapter = torch.nn.ModuleList(AdapterBlock(cin if i == 0 else D, D, 1, down=i == 0) for i in range(N_ADAPTER))
    self.zero_convs = torch.nn.ModuleList(torch.nn.Conv2d(D, D, 1) for _ in range(N_ADAPTER))

  def forward(self, lat, ts, txt, pooled, layout, cam, adj, dis_t, dis_c):
    """lat [B, T, V, C, h, w], layout [B, T, V, 6, 8h, 8w] (channels-first like diffusers) -> [B, T, V, C, h, w]."""
    b, t, v, c, hh, ww = lat.shape
    n, p, m = b * t * v, SD3_CFG["patch_size"], self.sd3
    gh, gw = hh // p, ww // p
    s = gh * gw
    x = m.pos_embed(lat.reshape(n, c, hh, ww))
    temb = m.time_text_embed(ts.reshape(n), pooled.reshape(n, -1))  # per (b, t, v): frame 0 has its own adaLN
    ctx = m.context_embedder(txt.reshape(n, txt.shape[3], -1))
    cam_emb = self.camera_embed(sinusoid(cam, 256).reshape(b, t, v, CAM * 256))  # [B, T, V, D]
    r, residuals = torch.nn.functional.pixel_unshuffle(layout.reshape(n, *layout.shape[3:]), DOWN), []
    for blk, proj in zip(self.adapter, self.zero_convs):
      r = blk(r)
      residuals.append(proj(r).flatten(2).transpose(1, 2))  # row-major tokens, like the patch embedding
    for i, block in enumerate(m.transformer_blocks):
      if i < len(residuals):
        x = x + residuals[i]
      ctx, x = block(hidden_states=x, encoder_hidden_states=ctx, temb=temb)
      if i in TL:  # each token position attends over the T frames of its view
        layer, x5 = self.temporal[TL.index(i)], x.reshape(b, t, v, s, D)
        h = x5 + (layer.index(t)[None, :, None] + cam_emb)[:, :, :, None]
        out = layer.block(h.permute(0, 2, 3, 1, 4).reshape(b * v * s, t, D))
        x = layer.blend(x5, out.reshape(b, v, s, t, D).permute(0, 3, 1, 2, 4), dis_t).reshape(n, s, D)
      if i in CL:  # each token row attends to the same row of the views that the adjacency lets it see
        layer, x5 = self.crossview[CL.index(i)], x.reshape(b, t, v, s, D)
        h = (x5 + (layer.index(v)[None, None] + cam_emb)[:, :, :, None]).reshape(b, t, v, gh, gw, D)
        seq = h.permute(0, 1, 3, 2, 4, 5).reshape(b * t * gh, v * gw, D)
        mask = adj.repeat_interleave(gw, 1).repeat_interleave(gw, 2)  # [B, V*w', V*w'], query rows
        mask = mask[:, None].expand(b, t * gh, v * gw, v * gw).reshape(b * t * gh, v * gw, v * gw)
        out = layer.block(seq, mask).reshape(b, t, gh, v, gw, D).permute(0, 1, 3, 2, 4, 5).reshape(b, t, v, s, D)
        x = layer.blend(x5, out, dis_c).reshape(n, s, D)
    x = m.proj_out(m.norm_out(x, temb)).reshape(n, gh, gw, p, p, -1)
    x = torch.einsum("nhwpqc->nchpwq", x).reshape(b, t, v, -1, hh, ww)
    return x


# ----------------------------------------------------------------------------------------------------------------------
# torch -> Flax for the added blocks (the backbone goes through import_into_cvd).
# ----------------------------------------------------------------------------------------------------------------------
def _np(p):
  return p.detach().numpy()


def _dense(lin):
  out = {"kernel": _np(lin.weight).T}
  if lin.bias is not None:
    out["bias"] = _np(lin.bias)
  return out


def _conv1x1(conv):
  return {"kernel": _np(conv.weight)[:, :, 0, 0].T, "bias": _np(conv.bias)}


def _ln(norm):
  return {"scale": _np(norm.weight), "bias": _np(norm.bias)}


def _mlp(emb):
  return {"linear_1": _dense(emb.linear_1), "linear_2": _dense(emb.linear_2)}


def _ff(ff):
  return {"proj": _dense(ff.net[0].proj), "out": _dense(ff.net[2])}


def _mix_layer(layer):
  blk, attn = layer.block, layer.block.attn1
  return {"index_embed": _mlp(layer.index_embed),
          "mixer": {"mix_factor": _np(layer.mix_factor)},
          "block": {"norm_in": _ln(blk.norm_in), "norm1": _ln(blk.norm1), "norm3": _ln(blk.norm3),
                    "ff_in": _ff(blk.ff_in), "ff": _ff(blk.ff),
                    "attn1": {"to_q": _dense(attn.to_q), "to_k": _dense(attn.to_k), "to_v": _dense(attn.to_v),
                              "to_out": _dense(attn.to_out[0]), "norm_q": {"scale": _np(attn.norm_q.weight)},
                              "norm_k": {"scale": _np(attn.norm_k.weight)}}}}


def added_params(ref):
  tree = {"camera_embed": _mlp(ref.camera_embed), "layout_adapter": {}}
  for j, layer in enumerate(ref.temporal):
    tree[f"temporal_blocks_{j}"] = _mix_layer(layer)
  for j, layer in enumerate(ref.crossview):
    tree[f"crossview_blocks_{j}"] = _mix_layer(layer)
  for i, (blk, proj) in enumerate(zip(ref.adapter, ref.zero_convs)):
    body = {"in_conv": _conv1x1(blk.in_conv)} if blk.in_conv is not None else {}
    for r, res in enumerate(blk.resnets):
      # OIHW -> HWIO; both are cross-correlations with padding 1.
      body[f"resnets_{r}_block1"] = {"kernel": _np(res.block1.weight).transpose(2, 3, 1, 0),
                                     "bias": _np(res.block1.bias)}
      body[f"resnets_{r}_block2"] = _conv1x1(res.block2)
    tree["layout_adapter"][f"body_{i}"] = body
    tree["layout_adapter"][f"zero_convs_{i}"] = _conv1x1(proj)
  return tree


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures and the test.
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
  torch.manual_seed(0)
  ref = RefCVD().eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith("mix_factor"):  # gates in (0.2, 0.8): both branches of every blend count
        p.uniform_(-1.4, 1.4)
      elif p.ndim == 1 and "norm" in name and "linear" not in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.2 * torch.randn_like(p))
      else:  # zero-initialised projections get random weights too
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
  folder = tmp_path_factory.mktemp("cvd_sd3") / "transformer"
  ref.sd3.save_pretrained(folder)
  partial, fresh = import_into_cvd(str(folder), MODEL_CFG)
  graft = traverse_util.flatten_dict(added_params(ref), sep="/")
  # The graft fills exactly what the backbone import leaves fresh, with the model's shapes.
  assert sorted(graft) == fresh
  params = {**traverse_util.flatten_dict(partial, sep="/"), **graft}
  shapes = traverse_util.flatten_dict(param_shapes_for(MODEL_CFG), sep="/")
  assert sorted(params) == sorted(shapes)
  for k, v in shapes.items():
    assert tuple(np.shape(params[k])) == tuple(v.shape), k
  params = traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, sep="/")
  return ref, jax.jit(CVDDiT(**MODEL_CFG).apply), params


def make_inputs():
  rng = np.random.default_rng(0)
  ts = rng.uniform(0, 1000, (B, T, V)).astype(np.float32)
  ts[:, 0] = 0.0  # frame 0 is a reference frame
  ring = np.eye(V, dtype=bool) | np.roll(np.eye(V, dtype=bool), 1, 1) | np.roll(np.eye(V, dtype=bool), -1, 1)
  forward_only = np.eye(V, dtype=bool) | np.eye(V, k=1, dtype=bool)  # view i sees i and i+1: not symmetric
  return dict(lat=rng.standard_normal((B, T, V, H, W, SD3_CFG["in_channels"])).astype(np.float32), ts=ts,
              txt=rng.standard_normal((B, T, V, L, SD3_CFG["joint_attention_dim"])).astype(np.float32),
              pooled=rng.standard_normal((B, T, V, SD3_CFG["pooled_projection_dim"])).astype(np.float32),
              layout=rng.uniform(0, 1, (B, T, V, H * DOWN, W * DOWN, 6)).astype(np.float32),
              cam=(2.0 * rng.standard_normal((B, T, V, CAM))).astype(np.float32), adj=np.stack([ring, forward_only]))


def run_ref(ref, x, dis_t, dis_c, adj=None):
  f = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
  with torch.no_grad():
    out = ref(f(x["lat"].transpose(0, 1, 2, 5, 3, 4)), f(x["ts"]), f(x["txt"]), f(x["pooled"]),
              f(x["layout"].transpose(0, 1, 2, 5, 3, 4)), f(x["cam"]), f(x["adj"] if adj is None else adj),
              f(np.array(dis_t)), f(np.array(dis_c)))
  return out.numpy().transpose(0, 1, 2, 4, 5, 3)


def rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_cvd_dit_matches_torch_reference(models):
  ref, apply, params = models
  x = make_inputs()
  outs = []
  # All blocks on; then temporal off for sample 1 and cross-view off for sample 0 (the per-sample gate).
  for dis_t, dis_c in (([False, False], [False, False]), ([False, True], [True, False])):
    want = run_ref(ref, x, dis_t, dis_c)
    args = [jnp.asarray(x[k]) for k in ("lat", "ts", "txt", "pooled", "layout", "cam", "adj")]
    got = np.asarray(apply({"params": params}, *args, jnp.asarray(dis_t), jnp.asarray(dis_c)))
    assert got.shape == want.shape == (B, T, V, H, W, SD3_CFG["out_channels"])
    err = rel_err(got, want)
    assert err <= TOL, (dis_t, dis_c, err)
    assert np.std(want) > 1e-2  # not a comparison of near-constant outputs
    outs.append(got)

  # The comparison is sharp enough to see the things it is meant to guard: disabling a block changes each sample by
  # far more than the tolerance, and so does reading the adjacency the wrong way round (sample 1's is asymmetric).
  full, gated = outs
  for bi in range(B):
    assert rel_err(gated[bi], full[bi]) > 100 * TOL, bi
  flipped = run_ref(ref, x, [False, False], [False, False], adj=x["adj"].transpose(0, 2, 1))
  assert rel_err(full[0], flipped[0]) <= TOL  # the ring is symmetric
  assert rel_err(full[1], flipped[1]) > 100 * TOL
