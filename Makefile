# One entry point for setup, tests, demo and benches. Everything runs from .venv, created by `make setup`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.setup-done
# Without an apt ROS 2 (no /opt/ros) the ROS tooling (tf2_ros, message_filters, launch_ros, ros2cli, ...) is built
# from the sources in ../shared/ros2 into .venv; on a robot it comes from apt and rosdep.
SHARED ?= $(abspath ../shared)
APT_ROS := $(wildcard /opt/ros/*/setup.bash)
# colcon lives in its own venv (it pins setuptools<80) and installs this package as on a robot, into COLCON_PREFIX.
COLCON_VENV := .colcon-venv
COLCON_PREFIX := build/colcon
COLCON_PATHS := . $(wildcard sal_ros_msgs)
# ament index and `ros2` of the bundle in .venv (an apt ROS 2 is sourced by the user instead).
ROS_ENV := $(if $(APT_ROS),,. $(SHARED)/ros2/env.sh $(VENV) &&)
# Localhost-only DDS and a private domain for everything started from here.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_DOMAIN_ID ?= 42
export FASTDDS_DEFAULT_PROFILES_FILE := $(CURDIR)/config/fastdds.xml
export RMW_IMPLEMENTATION := rmw_fastrtps_cpp

.PHONY: setup ros2-tools sal-ros-msgs colcon-install test soak demo bench clean

setup: $(STAMP) ros2-tools sal-ros-msgs colcon-install

# Re-run only when the pins change. torch/torchvision come from the machine's local wheel store.
$(STAMP): requirements.txt requirements-dev.txt Makefile setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements-dev.txt
	# sam2 builds against the venv's torch (no CUDA extension); without --no-build-isolation it pulls another torch.
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation sam2==1.1.0
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

# Idempotent (about 1 s when nothing changed; 75-120 s the first time on 2 cores).
ros2-tools: $(STAMP)
ifeq ($(APT_ROS),)
	@test -x $(SHARED)/ros2/build.sh || { echo "no ROS 2 apt install and no bundle at $(SHARED)/ros2: give SHARED=<the shared folder>"; exit 1; }
	VENV=$(VENV) $(SHARED)/ros2/build.sh
endif

# The sal_ros_msgs interfaces into .venv, built with the ament/rosidl wheels ros2-tools brings (idempotent: ~1 s,
# 15 s when its files changed). With an apt ROS 2 they come from the colcon install instead.
sal-ros-msgs: ros2-tools
ifeq ($(APT_ROS),)
	VENV=$(VENV) sal_ros_msgs/build_venv.sh
endif

$(COLCON_VENV)/.done: requirements-colcon.txt
	test -x $(COLCON_VENV)/bin/python || $(PYTHON) -m venv $(COLCON_VENV)
	$(COLCON_VENV)/bin/pip install -q -r requirements-colcon.txt
	touch $@

# Every time (about 2 s): the install must hold the current sources. Use it with
#   . $(SHARED)/ros2/env.sh .venv && . build/colcon/install/setup.sh && ros2 launch sal_ros segment.launch.py
colcon-install: ros2-tools $(COLCON_VENV)/.done
	$(ROS_ENV) PYTHONPATH=$$(echo $(CURDIR)/$(COLCON_VENV)/lib/python3*/site-packages) \
	  $(PY) $(COLCON_VENV)/bin/colcon --log-base $(COLCON_PREFIX)/log build --base-paths $(COLCON_PATHS) \
	  --build-base $(COLCON_PREFIX)/build --install-base $(COLCON_PREFIX)/install

test: setup
	$(PY) -m pytest -q test

# The reliability figures of docs/ros.md: launch / Ctrl-C and the lifecycle cycle, ten times each
soak: setup
	$(PY) -m pytest -q -s test -m soak

# Real weights or another dataset: make demo DEMO_ARGS="--masks sam2 --sam2-checkpoint ... --clip-pretrained openai"
demo: setup
	$(VENV)/bin/sal-ros demo $(DEMO_ARGS)

bench: setup
	$(VENV)/bin/sal-ros bench codec
	$(VENV)/bin/sal-ros bench model

clean:
	rm -rf $(VENV) $(COLCON_VENV) build *.egg-info demo_out
