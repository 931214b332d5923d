#!/bin/bash
# TPU pod slice: run the same command on every host of the slice (e.g. v5p-64), from a machine with gcloud.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/dit.py gs://bucket/runs/cvd1 [--config.key=value ...]
# Each host must have the project installed:  pip install "cvd_storm_jax[tpu] @ git+<your fork>"  (or a wheel).
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
EXTRA="$*"
# On Cloud TPU, jax.distributed.initialize() needs no coordinator address: it reads the slice metadata.
# CVD_DISTRIBUTED=1 makes the trainer call it before touching any device.
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  export CVD_DISTRIBUTED=1
  cd ~/cvd_storm_jax && python -m cvd_storm_jax.train --config=$CONFIG --workdir=$WORKDIR \
    --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 $EXTRA"
