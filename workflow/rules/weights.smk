# Pretrained files and ADM reference batches, fetched once into resources/ by `srdit fetch`.
# These are local rules: they run where snakemake itself runs (the login node, which has internet
# access), never on a compute node. `snakemake --profile profiles/slurm weights` fetches what the
# configured ablations need; a file that is already there is kept.


for _key, _res in RESOURCES.items():
    # One rule per file: the sd-vae entry is a folder, the others are single files.

    rule:
        name:
            f"fetch_{_key.replace('-', '_')}"
        localrule: True
        output:
            directory(resource_file(_key)) if _key == "sd-vae" else resource_file(_key),
        log:
            f"{RESULTS}/logs/fetch/{_key}.log",
        benchmark:
            f"{RESULTS}/benchmarks/fetch/{_key}.tsv"
        params:
            python=PYTHON,
            key=_key,
            root=output_folder,
        conda:
            "../../envs/srdit.yaml"
        shell:
            "{params.python} -m srdit fetch {params.key} --root {params.root} > {log} 2>&1"


rule weights:
    localrule: True
    input:
        [resource_file(key) for key in needed_resources()],
