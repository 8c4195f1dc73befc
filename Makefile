# akidb_ros — the two README commands: `make setup && make run`, and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export ROS_LOG_DIR ?= $(CURDIR)/build/ros_log

.PHONY: setup run test lint bench load deploy-tools validate-production image-test chaos clean

setup:
	bash scripts/setup.sh

run:
	@. scripts/dds_env.sh && exec $(PY) -m akidb_ros.server --mode inprocess

test:
	bash scripts/run_tests.sh

lint:
	$(VENV)/bin/flake8 .

bench:
	@. scripts/dds_env.sh && $(PY) bench/run.py --doors engine,ros,rest,grpc,rest-sidecar,grpc-sidecar

load:
	@. scripts/dds_env.sh && $(PY) bench/load/load_test.py

deploy-tools:
	bash scripts/install_deploy_tools.sh

validate-production:
	scripts/validate-production

image-test:
	bash scripts/install_deploy_tools.sh && bash scripts/image_test.sh

chaos:
	@. scripts/dds_env.sh && $(PY) bench/chaos/run.py

clean:
	rm -rf build install log
