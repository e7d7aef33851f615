#!/bin/sh
# Build the wheels of both packages into build/dist: hearth_device_sdk-<v>-py3-none-any.whl and
# hearth_gateway-<v>-py3-none-any.whl (pure Python, no compiled extensions). `make dist` and
# packaging/deb/build.sh use it.
#
#   packaging/build_wheels.sh [PYTHON]     (an interpreter with pip; default: python3)
#
# Built from a copy, so that the checkout gets no build/ or egg-info litter, and the LICENSE
# links in device-sdk/ and gateway/ become files inside the wheels.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
DIST=$PWD/build/dist
SRC=$PWD/build/wheel-src
rm -rf "$SRC"
mkdir -p "$SRC" "$DIST"
cp -RL device-sdk gateway "$SRC/"
rm -rf "$SRC"/*/build "$SRC"/*/src/*.egg-info
rm -f "$DIST"/hearth_device_sdk-*.whl "$DIST"/hearth_gateway-*.whl
"$PYTHON" -m pip --disable-pip-version-check -q wheel --no-deps -w "$DIST" \
    "$SRC/device-sdk" "$SRC/gateway"
rm -rf "$SRC"
ls "$DIST"/hearth_device_sdk-*.whl "$DIST"/hearth_gateway-*.whl
