# shellcheck shell=bash
# Requeue on preemption, for the sbatch files in this folder: `source scripts/slurm/requeue.sh`.
#
# Who requeues: the batch script, with these functions. A run of python -m llama2_lit that gets SIGUSR1 or SIGTERM
# saves a checkpoint at the next step boundary and exits with code 75 (callbacks/preemption.py: the project's
# Preemption callback replaces Lightning's SLURM signal handler during fit, so Lightning's own auto-requeue never
# runs; train.sbatch also turns it off outright, with SLURMEnvironment(auto_requeue=false)). On 75 the batch script
# calls `scontrol requeue $SLURM_JOB_ID`; the requeued job keeps its job id, so it finds the same run directory
# (hydra.run.dir named after the job id) and resume_override adds ckpt_path=last. Not after a SIGTERM to the batch
# shell (requeue_after_run): that is a scancel, which must stop the job, or a preemption, which SLURM requeues itself
# (PreemptMode=REQUEUE with --requeue).
#
# tests/test_cluster.py runs these functions with a fake scontrol on PATH.

PREEMPTED_EXIT_CODE=75   # callbacks/preemption.py PREEMPTED_EXIT_CODE (EX_TEMPFAIL)

# requeue_if_preempted STATUS [JOB_ID]: `scontrol requeue JOB_ID` (default $SLURM_JOB_ID) when STATUS is 75, nothing
# otherwise; returns STATUS either way. scontrol requeue ends this job (SLURM stops its processes) and puts it back
# in the queue under the same id.
requeue_if_preempted() {
    local status=$1 job=${2:-${SLURM_JOB_ID:-}}
    if [ "$status" != "$PREEMPTED_EXIT_CODE" ]; then
        return "$status"
    fi
    if [ -z "$job" ]; then
        echo "requeue: exit code $status (preempted, checkpoint saved) outside a SLURM job: not requeued" >&2
        return "$status"
    fi
    echo "requeue: exit code $status (preempted, checkpoint saved): scontrol requeue $job" >&2
    if ! scontrol requeue "$job"; then
        echo "requeue: scontrol requeue $job failed: resubmit by hand (the run resumes from its last checkpoint)" >&2
    fi
    return "$status"
}

# requeue_after_run STATUS: what the batch script does once run_forwarding_signals returned STATUS:
# requeue_if_preempted, unless this shell received SIGTERM without the time-limit warning (SIGUSR1) before it. Exit
# code 75 then follows a scancel (the job must stay cancelled) or a preemption (SLURM requeues the job itself when
# the partition's PreemptMode is REQUEUE). Returns STATUS.
requeue_after_run() {
    local status=$1 got=" ${RECEIVED_SIGNALS:-} "
    if [ "$status" = "$PREEMPTED_EXIT_CODE" ] && [[ $got == *" TERM "* && $got != *" USR1 "* ]]; then
        echo "requeue: exit code $status after SIGTERM (scancel, or a preemption SLURM requeues itself):" \
             "not requeued" >&2
        return "$status"
    fi
    requeue_if_preempted "$status"
}

# resume_override RUN_DIR [CKPT_DIR]: prints ckpt_path=last when CKPT_DIR (default RUN_DIR/checkpoints) holds
# last.ckpt (a file, a sharded-checkpoint folder or a link, even a dangling one: llama2_lit then falls back to the
# newest checkpoint that loads), and nothing for a fresh run (ckpt_path=last without a checkpoint is an error).
resume_override() {
    local last=${2:-$1/checkpoints}/last.ckpt
    if [ -e "$last" ] || [ -L "$last" ]; then
        echo "ckpt_path=last"
    fi
}

# run_forwarding_signals CMD [ARGS...]: run CMD in the background, pass SIGUSR1 and SIGTERM that reach this shell on
# to it (sbatch --signal=B:USR1@N signals the batch shell only; srun then forwards the signal to every task), and
# return CMD's exit status once it has ended. RECEIVED_SIGNALS lists the signals received ("USR1 TERM").
run_forwarding_signals() {
    "$@" &
    local pid=$! status previous
    _requeue_signalled=0
    RECEIVED_SIGNALS=""
    local sig
    for sig in USR1 TERM; do
        # shellcheck disable=SC2064  # $sig and $pid are expanded now, on purpose
        trap "_requeue_signalled=1; RECEIVED_SIGNALS+=' $sig'; echo 'requeue: SIG$sig received: passed on to the run' >&2
              kill -$sig $pid" "$sig"
    done
    wait "$pid"
    status=$?
    # a trapped signal makes `wait` return at once (status > 128) while the command runs on: wait again
    while [ "$_requeue_signalled" = 1 ] && [ "$status" -gt 128 ]; do
        _requeue_signalled=0
        previous=$status
        wait "$pid"
        status=$?
        if [ "$status" = 127 ]; then  # the first wait had collected the command's own status after all
            status=$previous
            break
        fi
    done
    trap - USR1 TERM
    return "$status"
}
