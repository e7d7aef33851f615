#!/bin/sh
# Set up everything `make demo` and `make test` need on a Debian machine: system packages
# (Mosquitto, python3-venv, Binaryen) when root, then a virtualenv with both packages in
# development mode.
set -eu
VENV=${VENV:-.venv}
# Pinned versions (constraints.txt) unless LOCK=0, which `make lock` uses to resolve afresh.
if [ "${LOCK:-1}" = 0 ]; then pins=""; else pins="-c constraints.txt"; fi

missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$missing python3-venv"
# Binaryen's wasm-opt instruments modules for migratable runs (docs/migration.md).
command -v wasm-opt >/dev/null 2>&1 || missing="$missing binaryen"
# Only the network-namespace capture test needs these (it skips without them and without root).
if [ "$(id -u)" = 0 ]; then
    command -v tcpdump >/dev/null 2>&1 || [ -x /usr/bin/tcpdump ] || missing="$missing tcpdump"
    command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing="$missing iproute2"
    # The C device client (device-sdk/c) and its test (which skips without them when not root).
    command -v cc >/dev/null 2>&1 || missing="$missing gcc libc6-dev"
    command -v pkg-config >/dev/null 2>&1 || missing="$missing pkg-config"
    [ -f /usr/include/mosquitto.h ] || missing="$missing libmosquitto-dev"
    [ -f /usr/include/msgpack.h ] || missing="$missing libmsgpack-dev"
    # The owner's page is tested in a real headless browser (tests/test_web.py).
    command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
    command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
fi
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "bootstrap: installing$missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $missing >/dev/null
        # Debian starts its own mosquitto on 127.0.0.1:1883; Hearth runs its own brokers.
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            systemctl disable --now mosquitto >/dev/null 2>&1 || true
        fi
    else
        echo "bootstrap: missing system packages:$missing" >&2
        echo "bootstrap: run: sudo apt-get install -y$missing" >&2
        exit 1
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --upgrade pip $pins
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q -e ./device-sdk -e ./gateway -r requirements-dev.txt $pins
# vision.plate runs the OCR models that ship inside this wheel on the gateway's own ONNX runner.
# Installed without its dependencies: we use only its model files, and its requirements would
# pull in the GUI build of OpenCV next to the headless one.
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q --no-deps "rapidocr-onnxruntime==1.4.4" $pins
echo "bootstrap: ready ($VENV)"
