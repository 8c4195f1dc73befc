# akidb_ros — the two README commands: `make setup && make run`, and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export ROS_LOG_DIR ?= $(CURDIR)/build/ros_log

.PHONY: setup run test test-fast lint bench clean

setup:
	bash scripts/setup.sh

run:
	@. scripts/dds_env.sh && exec $(PY) -m akidb_ros.server --mode inprocess

test:
	bash scripts/run_tests.sh

lint:
	$(VENV)/bin/flake8 akidb_ros test bench scripts

bench:
	$(PY) bench/run.py

clean:
	rm -rf build install log
