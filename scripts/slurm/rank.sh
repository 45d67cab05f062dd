#!/usr/bin/env bash
# One srun task of a multi-process run: scripts/slurm/rank.sh stage=sft trainer=ddp ...   (train.sbatch calls it)
#
# Every task runs the same python -m llama2_lit command; Lightning reads its rank from SLURM_PROCID, SLURM_LOCALID
# and SLURM_NODEID. Ranks above 0 get what Lightning's own launcher gives the processes it starts on one machine:
# no .hydra/ folder of their own (hydra.output_subdir=null: rank 0 writes it) and a log file of their own
# (train_ddp_process_<rank>.log beside rank 0's __main__.log). exec: SLURM's signals reach Python itself.
set -u
rank=${SLURM_PROCID:-0}
extra=()
if [ "$rank" != 0 ]; then
    extra=(hydra.output_subdir=null "hydra.job.name=train_ddp_process_${rank}")
fi
exec "${PYTHON:-python}" -m llama2_lit "$@" ${extra[@]+"${extra[@]}"}
