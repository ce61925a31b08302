# Sampling: shards of global sample indices (one job each, a Slurm array in the slurm profile), then
# one merge into ADM's samples.npz (arr_0: N,H,W,3 uint8) with a grid and the sampler sidecar.
# Sample i's noise depends only on (seed, i), so a shard is the same whichever job makes it.


rule sample_shard:
    input:
        unpack(sample_inputs),
    output:
        # the JSON sidecar is written last and marks the shard complete
        images=temp(f"{CACHE_ROOT}/samples/{{ablation}}/step{{step}}/{{tag}}/shards/shard{{shard}}.npz"),
        sidecar=temp(f"{CACHE_ROOT}/samples/{{ablation}}/step{{step}}/{{tag}}/shards/shard{{shard}}.json"),
    log:
        f"{RESULTS}/logs/sample/{{ablation}}/step{{step}}/{{tag}}/shard{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sample/{{ablation}}/step{{step}}/{{tag}}/shard{{shard}}.tsv"
    params:
        python=PYTHON,
        out=f"{CACHE_ROOT}/samples/{{ablation}}/step{{step}}/{{tag}}",
        shards=config["sample"]["shards"],
        flags=sample_flags,
    threads: 2
    conda:
        "../../envs/srdit.yaml"
    shell:
        "{params.python} -m srdit sample --snapshot {input.snapshot} --out {params.out}"
        " --shard {wildcards.shard} --num-shards {params.shards} {params.flags} > {log} 2>&1"


rule merge_samples:
    input:
        sample_shards,
    output:
        # retention.samples "remove": temp(), deleted once evaluated (the grid and metrics stay)
        samples=(temp if config["retention"]["samples"] == "remove" else str)(
            f"{CACHE_ROOT}/samples/{{ablation}}/step{{step}}/{{tag}}/samples.npz"),
        grid=report(
            f"{CACHE_ROOT}/samples/{{ablation}}/step{{step}}/{{tag}}/grid.png",
            caption="../report/grid.rst",
            category="Sample grids",
            subcategory="{ablation}",
            labels={"ablation": "{ablation}", "step": "{step}"},
        ),
        sidecar=f"{CACHE_ROOT}/samples/{{ablation}}/step{{step}}/{{tag}}/sampler.json",
    log:
        f"{RESULTS}/logs/merge/{{ablation}}/step{{step}}/{{tag}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/merge/{{ablation}}/step{{step}}/{{tag}}.tsv"
    params:
        python=PYTHON,
        out=f"{CACHE_ROOT}/samples/{{ablation}}/step{{step}}/{{tag}}",
    conda:
        "../../envs/srdit.yaml"
    shell:
        "{params.python} -m srdit merge {params.out} > {log} 2>&1"
