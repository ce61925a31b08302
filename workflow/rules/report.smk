# The report: the ablation table (CSV + Markdown) with the paper's numbers beside ours, the
# FID-vs-step curves and the sample grids, for the ablations of config["ablations"].
# `snakemake --report results/report/report.html` adds the workflow's own HTML report around them.
# A local rule: it only reads the small metrics files and copies the grids.

REPORT_DIR = f"{RESULTS}/report"


rule report:
    localrule: True
    input:
        report_inputs,
    output:
        csv=report(f"{REPORT_DIR}/ablations.csv", caption="../report/ablations.rst", category="Ablation table"),
        markdown=f"{REPORT_DIR}/ablations.md",
        curve=report(f"{REPORT_DIR}/fid_vs_step.png", caption="../report/fid_vs_step.rst", category="FID vs step"),
        grids=directory(f"{REPORT_DIR}/grids"),
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    params:
        python=PYTHON,
        args=report_args,
        title=config["report"]["title"],
        out=report_folder,
    conda:
        "../../envs/srdit.yaml"
    shell:
        "{params.python} -m srdit report --out {params.out} --title {params.title:q} {params.args} > {log} 2>&1"
