# Training as a chain of bounded segments. One job trains run {run} from the previous segment's
# checkpoint up to the next boundary (see BOUNDARIES in common.smk) and leaves the consolidated
# snapshot of that step, the declared output, which the next segment and the samplers read.
#
# The trainer runs under `srdit train-job` (srdit/trainjob.py), which decides what a stop means:
# - time limits and preemption: the trainer stops before the job's time limit (its time budget)
#   or on SIGTERM (`--signal` lead time, a preemption's grace time), checkpoints and exits; the
#   Slurm job then requeues itself (same job id, no Snakemake retry spent) and resumes from that
#   checkpoint, as many times as the segment needs: a boundary-to-boundary segment may take
#   several jobs' time limits. Outside Slurm it exits 75 and Snakemake's `retries` resubmit it.
# - a diverged run (exit 3, RUN/diverged.json) and a run another live trainer holds
#   (RUN/trainer.lock, exit 4) are refused before anything starts: a retry ends within seconds.
# - every attempt keeps its own log under results/logs/train/<run>/attempts/; the rule's log is a
#   symlink to the newest.
# Where a cluster cancels preempted jobs (PreemptMode=CANCEL) and one ends PREEMPTED before it
# could requeue itself, the plugin would wait on it forever: the `onstart` thread below requeues
# it (srdit/requeue.py). Snapshots are protected (read-only): a changed input never silently
# overwrites a trained run; delete results/runs/<run>/ to retrain it from scratch.


from srdit.requeue import start_for_workflow


onstart:
    start_for_workflow(workflow)


rule train_segment:
    input:
        unpack(segment_inputs),
    output:
        protected(f"{RESULTS}/runs/{{run}}/snapshots/step{{step}}.safetensors"),
    log:
        f"{RESULTS}/logs/train/{{run}}/step{{step}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{run}}/step{{step}}.tsv"
    params:
        python=PYTHON,
        run_dir=f"{RESULTS}/runs/{{run}}",
        launcher=train_launcher,
        shape=train_shape,
        flags=train_flags,
        budget=train_time_budget,
        step=until_step,
        stage=stage_flags,
        prune=prune_command,
    threads: 2
    conda:
        "../../envs/srdit.yaml"
    shell:
        # train-job: the diverged/lock gate, one log per attempt, requeue after an early stop
        "{params.python} -m srdit train-job --run-dir {params.run_dir} --output {output} --log {log} --"
        " {params.launcher} -m srdit train {wildcards.run} --run-dir {params.run_dir}"
        " --cache {input.cache} --until-step {params.step} {params.budget} {params.flags} {params.stage} {params.shape}"
        "{params.prune}"
