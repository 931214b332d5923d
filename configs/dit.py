r"""CVD-STORM diffusion transformer: the paper recipe, and a CPU-sized variant on the embedded synthetic clips.

Paper recipe (SD3.5-medium MM-DiT + 12 temporal + 6 cross-view blocks + layout adapter; 19 frames x 6 views; buckets
144x256 / 176x304 / 256x448; AdamW 6e-5 -> 1e-7 cosine; paper §4.1.3, OpenDWM C35), on a GPU node or TPU slice,
from converted SD3.5 weights and precomputed text embeddings:

  python -m cvd_storm_jax.train --config=configs/dit.py --workdir=$WORKDIR \
      --config.data.root=/data/cvd_shards --config.init_from=/ckpt/sd35_medium_params \
      --config.data.text_embeddings=/data/text_emb --config.latents.vae_from=/ckpt/storm_vae_params

Expect: about 4.1 B params; at 256x448 one clip is 51,072 image tokens (each image attends jointly with its 154 text
tokens). Only the paper's schedule is given (no step count for the main model); OpenDWM's C35 trains 40k steps.

Tiny variant (2-core CPU, a few minutes; the README's main-job command):

  python -m cvd_storm_jax.train --config=configs/dit.py:tiny --workdir=/tmp/cvd_tiny

Expect: loss starts near 2 (velocity MSE of unit-variance latents) and falls; TensorBoard events in
$WORKDIR/tb, checkpoints in $WORKDIR/checkpoints, final metrics in $WORKDIR/final_metrics.json.
"""
from __future__ import annotations

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  from cvd_storm_jax import sharding
  from cvd_storm_jax.data_pipelines.pipeline import default_data_config
  from cvd_storm_jax.models.cvd_dit import default_model_config

  tiny = arg == "tiny"
  if arg not in ("", "tiny"):
    raise ValueError(f"configs/dit.py takes '' (paper recipe) or 'tiny', got {arg!r}")
  c = ml_collections.ConfigDict()
  c.task = "dit"
  c.seed = 0
  c.total_steps = 200 if tiny else 40_000
  c.log_every = 10 if tiny else 50
  c.max_consecutive_nonfinite = 10  # skipped steps in a row before the run stops (checkpoint intact)
  # Microbatches per step (gradient accumulation): the step averages the gradients of data.batch_size / N samples
  # at a time, e.g. the paper's batch of 32 clips on 8 GPUs with N = 4. batch_size must divide by N x data x fsdp.
  c.grad_accum_steps = 1
  c.progress_bar = True
  c.init_from = ""  # a params file (python -m cvd_storm_jax.pretrained.sd3_transformer --src ... --out ...)

  # model.pos_embed_scale / model.pos_embed_offset: the position grid (None = diffusers' formula). Set them only when
  # the SD3 import names them (the checkpoint's stored table is on another grid), here and in the conversion alike.
  c.model = default_model_config("tiny" if tiny else "sd35_medium")
  c.data = default_data_config("tiny" if tiny else "paper")

  c.latents = ml_collections.ConfigDict()
  c.latents.kind = "pixel_unshuffle" if tiny else "vae"
  c.latents.projection_seed = 0
  # kind "vae": the frozen encoder inside the step, from an SD3.5 root / diffusers VAE folder or a STORM-VAE params
  # export (export_params: the paper's second stage). The paper recipe needs it.
  c.latents.vae_from = ""
  # Images per encoder call inside the step (bounds the encoder's activation memory): 19 divides a 19-frame x 6-view
  # clip's 114 images, so no call is padded.
  c.latents.chunk = 19

  c.text = ml_collections.ConfigDict()
  c.text.kind = "hashed_words" if tiny else "precomputed"
  c.text.vocab_size = 512
  c.text.max_length = 16
  # TextEmbeddingStore holding the "" prompt (text.kind = precomputed); "" = data.text_embeddings' own row 0.
  c.text.null_embedding = ""

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.shift = 3.0
  c.diffusion.logit_mean = 0.0
  c.diffusion.logit_std = 1.0
  c.diffusion.loss_form = "velocity"  # paper Eq. 4; "x0" = OpenDWM's sigma^2-weighted form
  c.diffusion.loss_on_reference_frames = False

  c.conditioning = ml_collections.ConfigDict()
  c.conditioning.text_drop = 0.2
  c.conditioning.box_drop = 0.2
  c.conditioning.map_drop = 0.2
  c.conditioning.generation_task_ratio = 0.25
  c.conditioning.image_generation_ratio = 0.3
  c.conditioning.reference_frame_counts = (1, 2, 3)
  c.conditioning.reference_frame_probs = (0.1, 0.3, 0.6)
  c.conditioning.reference_scale_std = 0.01
  c.conditioning.reference_offset_std = 0.01
  c.conditioning.crossview_drop = 0.1  # paper §4.1.3 drops cross-view blocks too; OpenDWM's C35 code does not (0.0)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.schedule = "cosine"  # "constant" = OpenDWM's released configs
  c.optimizer.lr = 1e-3 if tiny else 6e-5
  c.optimizer.end_lr = 1e-5 if tiny else 1e-7
  c.optimizer.warmup_steps = 10 if tiny else 500
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.975
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip = 1.0

  c.num_devices = 0  # 0 = every device (all hosts); N = only the first N (single-host debugging)
  # model.remat_policy "auto" (the paper recipe's) picks the least recomputation that fits this many GiB per device;
  # 0 = what the device's allocator may take (set XLA_PYTHON_CLIENT_MEM_FRACTION=.9 on GPUs: JAX's default is .75).
  c.memory_budget_gib = 0.0
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
