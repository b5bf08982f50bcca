# Two commands do all the set-up: `make run` (the pipeline on embedded defaults) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Prefect's ephemeral API server must start within this; its 20 s default is tight on a busy 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# No phoning home from the embedded server (these machines are offline; it would only log a failed lookup).
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: run test check smoke serve faults benchmark benchmark-export benchmark-recsys benchmark-replay benchmark-speedup benchmark-step benchmark-sweep benchmark-teacher benchmark-teacher-recipe benchmark-text ablation sweep deploy worker \
        data-source services clean-results

run: $(STAMP) data-source
	$(PY) -m flows.pipeline

# One pytest-xdist worker per core (TEST_WORKERS=0: no workers), each running a test file at a time, so a file's
# module fixtures (the e2e flow run, the integration stack) are made once; tests/conftest.py sends the longest first.
# (Not --dist loadgroup: under pytest 9.2 it groups nothing, pytest-dev/pytest-xdist#1386.)
TEST_WORKERS ?= auto
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP) data-source services
	$(PY) -m pytest -q --durations=15 $(XDIST)

# Fast feedback while editing: the unit, data-gate and flow tests, no whole-pipeline run and no server stack.
check: $(STAMP)
	$(PY) -m pytest -q -m "not e2e and not integration and not slow" -p no:cacheprovider $(XDIST)

# The whole stage graph and both gates on small data, in a scratch copy (.smoke/project) with its own MLflow
# store and registry: params.yaml, this project's outputs and its registry are never touched.
smoke: $(STAMP) data-source
	$(PY) -m flows.smoke $(SMOKE_ARGS)

# The fault catalogue: every injected fault or bad input the tests check, as a table with its count.
faults: $(STAMP)
	$(PY) -m tests.fault_catalogue

# Cold run + no-change re-run of the main job (vision and the recommender) in a scratch copy; prints the table the
# README quotes. Every family: `$(PY) -m flows.benchmark` without --family.
benchmark: $(STAMP) data-source
	$(PY) -m flows.benchmark --family vision --family recsys --teacher-target vision=0.95 --teacher-seconds vision=900 \
		--out reports/benchmarks/pipeline.json

# The pipeline's four ONNX models measured back to back against the deployment targets (after `make run`).
benchmark-export: $(STAMP)
	$(PY) -m flows.export_benchmark --family $(or $(FAMILY),vision) --out reports/benchmarks/export_$(or $(FAMILY),vision).json

# The recommender: LR and FM baselines trained now next to the pipeline's CTR models (after `make run`).
benchmark-recsys: $(STAMP)
	$(PY) -m tasks.recsys.benchmark --out reports/benchmarks/recsys.json

# The text family: teacher, labels-only and distilled students (FP32 and INT8), 3 student seeds (after `make run`).
benchmark-text: $(STAMP)
	$(PY) -m tasks.text.benchmark --out reports/benchmarks/text.json

# How steady the gate's speed-up is: paired rounds vs one timing each, on a family's exported files (after `make run`).
benchmark-speedup: $(STAMP)
	$(PY) -m flows.speedup_benchmark --family $(or $(FAMILY),recsys) --out reports/benchmarks/speedup_$(or $(FAMILY),recsys).json

# Distillation's frozen teacher in PyTorch vs the same teacher as ONNX in onnxruntime (an imported teacher);
# FAMILY=<image family>, in the shape of its data (after `dvc repro prepare_<family>`).
benchmark-teacher: $(STAMP)
	$(PY) -m flows.teacher_benchmark --family $(or $(FAMILY),vision) --out reports/benchmarks/teacher_$(or $(FAMILY),vision).json

# Where an image family's training step spends its time (teacher step, distillation step), by part: batch,
# augmentation, frozen teacher, forward / backward convolutions, batch norm, activations, optimizer
# (after `dvc repro prepare_<family>`).
benchmark-step: $(STAMP)
	$(PY) -m flows.step_profile --family $(or $(FAMILY),vision) --out reports/benchmarks/step_$(or $(FAMILY),vision).json

# The teacher's recipe arms (params; + random erasing), each with its moving average and flip TTA, on validation.
benchmark-teacher-recipe: $(STAMP)
	$(PY) -m flows.teacher_recipe --family $(or $(FAMILY),vision) --epochs $(or $(EPOCHS),10) --out reports/benchmarks/teacher_recipe_$(or $(FAMILY),vision).json

# Compression recipes of sweep.family on Dask (a LocalCluster, or SWEEP_ARGS='--address tcp://host:8786').
sweep: $(STAMP) data-source
	$(PY) -m flows.sweep $(SWEEP_ARGS)

# MovieLens-100K replayed batch by batch through ingestion, retraining and the gate (full profile, a scratch copy per
# training policy): per batch the challenger's validation AUC, both models' AUC on the recent and golden windows, the
# decision, the time. Both policies: about 80 minutes on 2 cores. REPLAY_ARGS='--batches 6' replays the first six.
benchmark-replay: $(STAMP) data-source
	$(PY) -m flows.replay_benchmark --family recsys --policy scratch --policy fine_tune,teacher_every=4 \
	    --out reports/benchmarks/replay_recsys.json --plot reports/benchmarks/replay_recsys.png $(REPLAY_ARGS)

# The same 8 smoke-sized recipes with 1 and with 2 Dask workers, in a scratch copy: the speed-up table.
benchmark-sweep: $(STAMP) data-source
	$(PY) -m flows.sweep_benchmark --out reports/benchmarks/sweep.json

# The registry's champion over HTTP with MLflow's scoring server (POST /invocations on 127.0.0.1:5001); e.g.
# SERVE_ARGS='--family recsys --port 5002'. Runs against $$MLFLOW_TRACKING_URI, else the project's store.
serve: $(STAMP)
	$(PY) -m flows.serve $(SERVE_ARGS)

# Register prefect.yaml's deployments with the Prefect server at $$PREFECT_API_URL; `make worker` runs them here.
deploy: $(STAMP)
	$(VENV)/bin/prefect work-pool create kdq-process --type process --overwrite
	$(VENV)/bin/prefect --no-prompt deploy --all

worker: $(STAMP)
	KDQ_PROJECT_DIR='$(CURDIR)' $(VENV)/bin/prefect worker start --pool kdq-process

# Every compression arm x ablation.<family>.seeds on the full data, measured as ONNX; writes reports/ablation/.
# FAMILY=<name>: an image family with an ablation block (default: the first one in params.yaml).
ablation: $(STAMP) data-source
	$(PY) -m flows.ablation $(if $(FAMILY),--family $(FAMILY))

# The virtualenv, rebuilt only when the dependency spec or the lock changes.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

# Fashion-MNIST from Debian when we may install packages; otherwise the stage tries its other sources.
data-source:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "note: could not install dataset-fashion-mnist; the data stage will try its other sources"; \
	fi

# The integration suite starts a real PostgreSQL server (Debian's package) as its own process; the end-to-end suite
# opens our HTML pages in Debian's headless Chromium.
services:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi
	@if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium-headless-shell fonts-dejavu-core >/dev/null; \
	fi

# Every family of params.yaml (its `families: [...]` line) keeps what its stages write under data/<family>.
FAMILIES = $(shell sed -n 's/^families: *\[\(.*\)\].*/\1/p' params.yaml | tr ',' ' ')
clean-results:
	$(if $(strip $(FAMILIES)),,$(error params.yaml has no `families: [...]` line to read the families from))rm -rf \
	  $(addprefix data/,$(FAMILIES)) models metrics plots reports checkpoints mlflow.db mlartifacts
