# Training as a chain of bounded segments. One job trains run {run} from the previous segment's
# checkpoint up to the next boundary (see BOUNDARIES in common.smk) and leaves the consolidated
# snapshot of that step, the declared output, which the next segment and the samplers read.
#
# Preemption and time limits: the trainer checkpoints on SIGTERM/SIGUSR1 and exits 75; the job
# then counts as failed and Snakemake resubmits it (`retries` in the profile), and the resubmitted
# job resumes from that checkpoint. Snapshots are protected (read-only): a changed input never
# silently overwrites a trained run; delete results/runs/<run>/ to retrain it from scratch.


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
        # A segment that stopped early (time budget, preemption) exits 75, "try again": the
        # resubmitted job (profile `retries`) resumes from the checkpoint it wrote. Snakemake
        # clears the log of an attempt that is retried; the run's metrics.jsonl keeps every one.
        "{params.launcher} -m srdit train {wildcards.run} --run-dir {params.run_dir}"
        " --cache {input.cache} --until-step {params.step} {params.budget} {params.flags} {params.stage} {params.shape} > {log} 2>&1;"
        " test -e {output} || {{ echo 'srdit: segment stopped before step {params.step};"
        " rerun to resume from its checkpoint' >> {log}; exit 75; }}{params.prune}"
