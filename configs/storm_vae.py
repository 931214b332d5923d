r"""STORM-VAE: the SD3.5 VAE fine-tuned jointly with a STORM-style Gaussian-splatting decoder (paper §3.2, §4.1.3).

Paper recipe (SD3.5 VAE + STORM-B/8-like GS decoder; 19-frame clips, context frames 1/7/13/19, 3 random targets,
6 view slots with view mask; L = L_VAE + 0.5 L_STORM), from the SD3.5 VAE weights:

  python -m cvd_storm_jax.train --config=configs/storm_vae.py --workdir=$WORKDIR \
      --config.init_from_vae=/ckpt/stable-diffusion-3.5-medium/vae --config.data.root=/data/cvd_shards

Expect: 83.8 M VAE params + ~90 M GS-decoder params; at 256x448 one sample is 24 context images (43,008 GS tokens,
2.75 M Gaussians) rendered into 18 target images. The paper gives no optimiser settings for STORM-VAE: STORM's AdamW
(b2 0.95, wd 0.05, clip 3.0, 5k warmup, constant) at lr 1e-4 instead of STORM's 4e-4 because the VAE starts
pretrained (our choice); no LPIPS/KL weights are published either (MSE 1, LPIPS 1, KL 1e-6 on the mean KL).

Tiny variant (2-core CPU; synthetic 6-view clips of 4 frames at 32x56, context frames 0 and 3, 2 targets):

  python -m cvd_storm_jax.train --config=configs/storm_vae.py:tiny --workdir=/tmp/storm_vae_tiny

Expect: loss falls from ~1 within a few hundred steps; the metrics storm_psnr / vae_psnr rise.
Evaluate a run: python -m cvd_storm_jax.eval_storm --config=configs/storm_vae.py:tiny \
  --checkpoint=/tmp/storm_vae_tiny --out=/tmp/storm_vae_tiny/eval
"""
from __future__ import annotations

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  from cvd_storm_jax import sharding
  from cvd_storm_jax.data_pipelines.pipeline import default_data_config

  tiny = arg == "tiny"
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/storm_vae.py takes '' (paper recipe) or 'tiny', got {arg!r}")
  c = ml_collections.ConfigDict()
  c.task = "storm_vae"
  c.seed = 0
  c.total_steps = 300 if tiny else 100_000
  c.log_every = 10 if tiny else 50
  c.max_consecutive_nonfinite = 10
  # Microbatches per step (gradient accumulation): the step averages the gradients of data.batch_size / N samples
  # at a time, e.g. the paper's batch of 32 clips on 8 GPUs with N = 4. batch_size must divide by N x data x fsdp.
  c.grad_accum_steps = 1
  c.progress_bar = True
  c.init_from = ""  # a params file of the whole task (cvd_storm_jax.checkpoint.save_params)
  c.init_from_vae = ""  # a diffusers AutoencoderKL folder (or a root with vae/): the SD3.5 VAE weights

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32" if tiny else "bfloat16"
  c.model.gs_latent = "sample"  # "sample" (the VAE decoder's posterior sample) or "mean": see models/storm_vae.py
  c.model.vae_remat = not tiny
  c.model.vae = ml_collections.ConfigDict(
      dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8) if tiny else
      dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32))
  # GSDecoderConfig: "size" picks default_gs_decoder_config(size); any other key overrides a field.
  c.model.gs = ml_collections.ConfigDict(
      dict(size="tiny", num_views=6, pos_grid=(4, 7), near=0.5, far=120.0) if tiny else
      dict(size="paper", num_views=6, pos_grid=(32, 56), near=0.2, far=400.0, remat=True))

  c.storm = ml_collections.ConfigDict()
  c.storm.context_frames = (0, 3) if tiny else (0, 6, 12, 18)  # paper: the 1st, 7th, 13th and 19th frames
  c.storm.num_targets = 2 if tiny else 3
  c.storm.target_frames = ()  # fixed target frames (empty: random each step)
  c.storm.min_views = 2  # fewer real views -> VAE branch only (OpenDV)
  c.storm.require_lidar = True  # no LiDAR depth anywhere in the clip -> VAE branch only

  c.loss = ml_collections.ConfigDict()
  c.loss.storm_lambda = 0.5
  c.loss.lpips_net = "none" if tiny else "vgg16"
  c.loss.lpips_remat = not tiny  # recompute the VGG16 features in the backward pass (memory)
  c.loss.vae = ml_collections.ConfigDict(dict(mse=1.0, lpips=0.0 if tiny else 1.0, kl=1e-6))
  c.loss.storm = ml_collections.ConfigDict(dict(rgb=1.0, lpips=0.0 if tiny else 0.05, depth=1.0, sky=0.1,
                                                flow_reg=0.005, lpips_start_step=5000, min_depth=0.01))

  c.data = default_data_config("tiny" if tiny else "paper")
  if tiny:
    c.data.buckets = [(32, 56, 1.0)]
    c.data.synthetic.height, c.data.synthetic.width = 32, 56
  else:
    c.data.batch_size = 32  # paper §4.1.1: batch size 32 on H100s

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.schedule = "constant"
  c.optimizer.lr = 1e-3 if tiny else 1e-4
  c.optimizer.end_lr = 1e-3 if tiny else 1e-4
  c.optimizer.warmup_steps = 10 if tiny else 5000
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip = 3.0

  c.num_devices = 0  # 0 = every device (all hosts); N = only the first N (single-host debugging)
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1} if tiny else
                                     {"data": 1, "fsdp": -1, "tensor": 1})
  c.sharding_rules = sharding.default_rules()

  # A jax.profiler trace of steps start_step+1 .. start_step+num_steps (after compilation) on process 0, into the
  # TensorBoard folder (workdir/tb/plugins/profile/): `tensorboard --logdir $WORKDIR/tb`, Profile tab. 0 = off.
  c.profile = ml_collections.ConfigDict({"start_step": 10, "num_steps": 0})
  # XLA options of the train step's program alone (jax.jit compiler_options: DebugOptions fields such as
  # xla_gpu_enable_latency_hiding_scheduler=True), on top of XLA_FLAGS. Empty: XLA's defaults.
  c.compiler_options = ml_collections.ConfigDict()

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100 if tiny else 1000
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  return c
