# gradstudy: `make sweep` and `make test` set everything up on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.install-stamp
SPACE  ?= search_spaces/default.yaml
STUDY  ?= mnist1d_families
PORT   ?= 5000

REPRODUCE ?= mnist1d_paper faghri_variance critical_batch sngrad_table sngrad_mnist \
             sngrad_fashion_mnist sngrad_cifar10 wtb_label_noise gradient_scales
SPACES    ?= search_spaces

.PHONY: install sweep reproduce report ui test test-quick bench lint clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes. torch/torchvision are pinned to the releases
# pip finds on local disk here (torch 2.14.1 / torchvision 0.29.1).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

sweep: $(STAMP)            ## run (or resume) a study: make sweep SPACE=search_spaces/x.yaml [FRESH=1]
	$(PY) -m study sweep $(SPACE) $(if $(FRESH),--fresh)

reproduce: $(STAMP)        ## the reproduction studies whose data is on disk (resumable), then their claims
	@ran=""; for study in $(REPRODUCE); do \
		line=$$($(PY) -m study has-data $(SPACES)/$$study.yaml); rc=$$?; \
		if [ $$rc -eq 1 ]; then echo "$$line"; continue; fi; \
		if [ $$rc -ne 0 ]; then exit $$rc; fi; \
		echo "== $$study"; \
		$(PY) -m study sweep $(SPACES)/$$study.yaml $(if $(FRESH),--fresh) || exit $$?; \
		ran="$$ran $$study"; \
	done; \
	echo; echo "== claims"; \
	if [ -n "$$ran" ]; then $(PY) -m study claims $$ran; else echo "no study ran"; fi

report: $(STAMP)           ## tables + figures for a study: make report STUDY=mnist1d_families
	$(PY) -m study report --study $(STUDY)

ui: $(STAMP)               ## MLflow UI on 127.0.0.1 only
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui \
		--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT) --workers 1

test: $(STAMP)             ## the whole suite (what CI runs)
	$(PY) -m pytest -q

test-quick: $(STAMP)       ## everything but the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)            ## speed targets, printed as ratios measured side by side
	@mkdir -p bench/results
	for b in bench/*.py; do $(PY) $$b --json bench/results/$$(basename $$b .py).json || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check study analysis tests bench

clean:
	rm -rf results reports mlflow.db mlartifacts
