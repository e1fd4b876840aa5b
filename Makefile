# Set-up is part of every target: the first run creates .venv and installs the project, later runs reuse it.
VENV    ?= .venv
PYTHON  ?= python3
STAMP   := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job: synthetic videos -> local Ray -> DeepSpeed training on 2 CPU workers -> MLflow
	$(VENV)/bin/evl demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) data/synth runs mlflow.db
