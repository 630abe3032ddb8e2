# One entry point for setup, tests, demo and benches. Everything runs from .venv, created by `make setup`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.setup-done
# Localhost-only DDS and a private domain for everything started from here.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 42
export FASTDDS_DEFAULT_PROFILES_FILE := $(CURDIR)/config/fastdds.xml
export RMW_IMPLEMENTATION := rmw_fastrtps_cpp

.PHONY: setup test demo bench clean

setup: $(STAMP)

# Re-run only when the pins change. torch/torchvision come from the machine's local wheel store.
$(STAMP): requirements.txt requirements-dev.txt Makefile setup.py $(wildcard sal_ros_msgs/msg/*.msg)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements-dev.txt
	# sam2 builds against the venv's torch (no CUDA extension); without --no-build-isolation it pulls another torch.
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation sam2==1.1.0
	$(PIP) install -q --no-build-isolation --no-deps -e .
	# sal_ros_msgs (vocabulary, frame summary interfaces) built with the ament/rosidl wheels into the venv
	VENV=$(VENV) sal_ros_msgs/build_venv.sh
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q test

# Real weights or another dataset: make demo DEMO_ARGS="--masks sam2 --sam2-checkpoint ... --clip-pretrained openai"
demo: setup
	$(VENV)/bin/sal-ros demo $(DEMO_ARGS)

bench: setup
	$(VENV)/bin/sal-ros bench codec
	$(VENV)/bin/sal-ros bench model

clean:
	rm -rf $(VENV) build *.egg-info demo_out
