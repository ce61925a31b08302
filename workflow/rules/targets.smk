# One target per ablation entry and per group, named after it, so that
#   snakemake --profile profiles/slurm --configfile=config/imagenet256.yaml b1_srdit
# trains what is missing, samples and evaluates that row, and
#   snakemake ... guidance
# does the whole guidance grid. Any registry entry can be built by name, listed in
# config["ablations"] or not.

for _name in REGISTRY:

    rule:
        name:
            _name
        input:
            entry_outputs(_name),


for _group in GROUPS:
    if _group in REGISTRY:
        continue            # an entry of the same name wins

    rule:
        name:
            _group
        input:
            [path for _n in REGISTRY if entry_group(_n) == _group for path in entry_outputs(_n)],
