# FID, sFID, IS, precision/recall and KDD of one samples.npz against the entry's reference batch.
# The metrics JSON records the sampler settings, the feature extractors, the reference checksum and
# the library versions (srdit evaluate).


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        f"{RESULTS}/metrics/{{ablation}}/step{{step}}/{{tag}}/metrics.json",
    log:
        f"{RESULTS}/logs/evaluate/{{ablation}}/step{{step}}/{{tag}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{ablation}}/step{{step}}/{{tag}}.tsv"
    params:
        python=PYTHON,
        flags=evaluate_flags,
    threads: 2
    conda:
        "../../envs/srdit.yaml"
    shell:
        "{params.python} -m srdit evaluate --samples {input.samples} --reference {input.reference}"
        " --out {output} {params.flags} > {log} 2>&1"
