# Images -> ADM center crop -> uint8 HDF5 shards -> one joined view; then latents (+ teacher
# features) the same way. Shards are independent jobs (a Slurm array in the slurm profile); a shard
# is complete only once its file has been renamed into place, so a killed job never leaves a file
# that looks finished, and a rerun redoes only the missing shards. The joins only write an index
# over the shards, and the demo images are a few files: local rules, no job of their own.


rule demo_images:
    localrule: True
    output:
        directory(f"{CACHE_ROOT}/demo_images"),
    log:
        f"{RESULTS}/logs/demo_images.log",
    benchmark:
        f"{RESULTS}/benchmarks/demo_images.tsv"
    conda:
        "../../envs/srdit.yaml"
    params:
        python=PYTHON,
        per_class=config["data"]["demo_per_class"],
    shell:
        "{params.python} -m srdit demo-data --out {output} --per-class {params.per_class} > {log} 2>&1"


rule prepare_images:
    input:
        src=image_source(),
    output:
        f"{CACHE_ROOT}/cache/{{dataset}}/images{{res}}/shard{{shard}}.h5",
    log:
        f"{RESULTS}/logs/prepare/{{dataset}}/images{{res}}/shard{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare/{{dataset}}/images{{res}}/shard{{shard}}.tsv"
    params:
        python=PYTHON,
        shards=config["data"]["prepare_shards"],
    threads: 4
    conda:
        "../../envs/srdit.yaml"
    shell:
        "{params.python} -m srdit prepare --src {input.src} --out {output} --resolution {wildcards.res}"
        " --shard {wildcards.shard} --num-shards {params.shards} --workers {threads} > {log} 2>&1"


rule join_images:
    localrule: True
    input:
        image_shards,
    output:
        f"{CACHE_ROOT}/cache/{{dataset}}/images{{res}}/images.h5",
    log:
        f"{RESULTS}/logs/prepare/{{dataset}}/images{{res}}/join.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare/{{dataset}}/images{{res}}/join.tsv"
    conda:
        "../../envs/srdit.yaml"
    params:
        python=PYTHON,
    shell:
        "{params.python} -m srdit prepare --join {input} --out {output} > {log} 2>&1"


rule encode_latents:
    input:
        images=f"{CACHE_ROOT}/cache/{{dataset}}/images{{res}}/images.h5",
        weights=encode_weights,
    output:
        f"{CACHE_ROOT}/cache/{{dataset}}/latents{{res}}-{{cache}}/shard{{shard}}.h5",
    log:
        f"{RESULTS}/logs/encode/{{dataset}}/latents{{res}}-{{cache}}/shard{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/encode/{{dataset}}/latents{{res}}-{{cache}}/shard{{shard}}.tsv"
    params:
        python=PYTHON,
        shards=config["data"]["encode_shards"],
        flags=encode_flags,
        resources_dir=RESOURCES_DIR,
    threads: 2
    conda:
        "../../envs/srdit.yaml"
    shell:
        "{params.python} -m srdit encode --images {input.images} --out {output} {params.flags}"
        " --resources {params.resources_dir} --shard {wildcards.shard} --num-shards {params.shards}"
        " > {log} 2>&1"


rule join_latents:
    localrule: True
    input:
        latent_shards,
    output:
        f"{CACHE_ROOT}/cache/{{dataset}}/latents{{res}}-{{cache}}/cache.h5",
    log:
        f"{RESULTS}/logs/encode/{{dataset}}/latents{{res}}-{{cache}}/join.log",
    benchmark:
        f"{RESULTS}/benchmarks/encode/{{dataset}}/latents{{res}}-{{cache}}/join.tsv"
    conda:
        "../../envs/srdit.yaml"
    params:
        python=PYTHON,
    shell:
        "{params.python} -m srdit encode --join {input} --out {output} > {log} 2>&1"


rule reference_batch:
    # Only for reference batches listed in config data.build_references (the demo); the paper's
    # are ADM's files, fetched by the weights rules.
    input:
        images=f"{CACHE_ROOT}/cache/{{dataset}}/images{{res}}/images.h5",
    output:
        f"{CACHE_ROOT}/reference/{{dataset}}/images{{res}}/{{refname}}",
    log:
        f"{RESULTS}/logs/reference/{{dataset}}/images{{res}}/{{refname}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/reference/{{dataset}}/images{{res}}/{{refname}}.tsv"
    params:
        python=PYTHON,
        flags=reference_flags,
    wildcard_constraints:
        refname="|".join(re.escape(r) for r in config["data"]["build_references"]) or "(?!)",
    conda:
        "../../envs/srdit.yaml"
    shell:
        "{params.python} -m srdit reference-batch --source {input.images} --out {output} {params.flags} > {log} 2>&1"
