#!/bin/bash
# TPU pod slice: run the same command on every host of the slice (e.g. v5p-64), from a machine with gcloud.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/dit.py gs://bucket/runs/cvd1 [--config.key=value ...]
# Each host needs a clone of the repository at ~/cvd_storm_jax (the configs/ files are not in the wheel), installed:
#   git clone <your fork> ~/cvd_storm_jax && pip install -e "~/cvd_storm_jax[tpu]"
# Before the first slice is paid for, on any CPU machine: python benchmarks/check_tpu_lowering.py (lowers both train
# steps for TPU, sharded too).
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
# Quoted for the remote shell: tuple overrides such as --config.data.buckets='((256,448,1.0),)' and values with
# spaces arrive as they were given.
EXTRA=$(printf ' %q' "$@")
CONFIG=$(printf '%q' "$CONFIG"); WORKDIR=$(printf '%q' "$WORKDIR")
# On Cloud TPU, jax.distributed.initialize() needs no coordinator address: it reads the slice metadata.
# CVD_DISTRIBUTED=1 makes the trainer call it before touching any device.
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  export CVD_DISTRIBUTED=1
  cd ~/cvd_storm_jax && python -m cvd_storm_jax.train --config=$CONFIG --workdir=$WORKDIR \
    --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 $EXTRA"
