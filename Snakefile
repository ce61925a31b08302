# srdit: reproduce Speedrunning ImageNet Diffusion (SR-DiT) and each of its ablations.
#
#   snakemake --profile profiles/local                                   # the CPU demo (default config)
#   snakemake --profile profiles/slurm --configfile=config/imagenet256.yaml            # the paper
#   snakemake --profile profiles/slurm --configfile=config/imagenet256.yaml b1_srdit   # one row
# Write `--configfile=FILE` with "=": the option takes several files, so in
# `--configfile FILE TARGET` the target would be read as a second config file.
#
# weights -> prepare -> encode -> train (segments) -> sample (shards) -> merge -> evaluate -> report

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("8.20")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/targets.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
