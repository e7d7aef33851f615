#!/bin/sh
# Build the Debian package of the gateway: build/deb/hearth-gateway_<version>_<arch>.deb.
#
#   packaging/deb/build.sh            (from anywhere in the checkout; root is not needed)
#
# What it holds: a virtualenv at /opt/hearth/venv with hearth-gateway, hearth-device-sdk and
# every dependency at the version constraints.txt pins, made here at build time from wheels;
# the systemd unit from systemd/, a drop-in that points it at the default config
# /etc/hearth/gateway.toml (a conffile), the docs the unit names, and the maintainer scripts
# beside this file. Installing runs no pip and downloads nothing: dpkg unpacks files it then
# knows by name (dpkg -L, dpkg -S, debsums), and removes them itself.
#
# Why not Architecture: all: numpy, onnxruntime, opencv, wasmtime and cryptography are compiled
# wheels for one CPU architecture and one CPython ABI, so the package is built for the
# architecture of the machine that builds it (build on an arm64 box for a Raspberry Pi) and
# depends on the exact interpreter its venv was made with (python3.11 on Debian 12).
#
# Wheels come from build/wheelhouse, filled from the package registry (pip's configured index)
# the first time and reused offline afterwards; delete it to refresh after `make lock`.
# Environment: PYTHON (the target's interpreter, default /usr/bin/python3), DEB_COMPRESS
# (dpkg-deb -Z: zstd, the default, which dpkg reads since 1.21.18, i.e. Debian 12; xz takes
# ten minutes on two cores), DEB_LEVEL (dpkg-deb -z, default 9), DEB_ACCEL (empty: the plain
# CPU build of onnxruntime; "openvino": the package hearth-gateway-openvino, whose venv has
# onnxruntime-openvino instead (constraints-openvino.txt), which recommends Intel's OpenCL
# driver so OpenVINO can use the iGPU, and which replaces the plain package: both ship the
# same files). DEB_CONTROL_ONLY=1 prints the control file and stops (the tests read it).
set -eu
# pip would take packages on a PYTHONPATH (a checkout's sources) for installed ones and leave
# them out of the venv.
unset PYTHONPATH
started=$(date +%s)
step() { echo "build_deb: [$(( $(date +%s) - started ))s] $*"; }
cd "$(dirname "$0")/../.."
ROOT=$PWD
PYTHON=${PYTHON:-/usr/bin/python3}
COMPRESS=${DEB_COMPRESS:-zstd}
LEVEL=${DEB_LEVEL:-9}
OUT=$ROOT/build/deb
DIST=$ROOT/build/dist
WHEELHOUSE=$ROOT/build/wheelhouse
HERE=$ROOT/packaging/deb

# The interpreter the venv will run: resolved to its versioned name (python3.11), which is what
# the package depends on, so that a later python3 default (3.12) cannot break it unseen.
PYTHON=$(readlink -f "$PYTHON")
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VERSION=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("gateway/pyproject.toml", "rb"))["project"]["version"])')
SDK_VERSION=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("device-sdk/pyproject.toml", "rb"))["project"]["version"])')
ARCH=$(dpkg --print-architecture)
# No project address exists yet; set DEB_MAINTAINER to whoever publishes the package.
MAINTAINER=${DEB_MAINTAINER:-Hearth developers <hearth@invalid>}
ACCEL=${DEB_ACCEL:-}
case $ACCEL in
    "")
        PACKAGE=hearth-gateway
        # The accelerated build for Intel boxes is a package of its own (docs/accelerators.md).
        RELATIONS="Suggests: bpftool, hearth-gateway-openvino"
        ACCEL_DESCRIPTION=" .
 This build runs models with onnxruntime's CPU provider; on an Intel box,
 hearth-gateway-openvino runs them on the CPU, iGPU or NPU with OpenVINO." ;;
    openvino)
        PACKAGE=hearth-gateway-openvino
        # OpenVINO's GPU plugin drives an Intel iGPU through its OpenCL driver; without it
        # OpenVINO still runs on the CPU (and the NPU has its own kernel driver).
        RELATIONS="Recommends: intel-opencl-icd
Suggests: bpftool
Provides: hearth-gateway
Conflicts: hearth-gateway
Replaces: hearth-gateway"
        ACCEL_DESCRIPTION=" .
 This build has onnxruntime-openvino in place of onnxruntime: each model runs
 on OpenVINO (CPU, iGPU or NPU) where it loads, agrees with the CPU provider
 and is faster, and on the CPU provider otherwise (hearth-gateway doctor)." ;;
    *) echo "build_deb: DEB_ACCEL must be empty or openvino, not $ACCEL" >&2; exit 2 ;;
esac
DEB=$OUT/${PACKAGE}_${VERSION}_${ARCH}.deb
# Must match what bootstrap.sh installs beside the gateway (vision.plate's models).
RAPIDOCR="rapidocr-onnxruntime==1.4.4"

control() {
    # $1: the installed size in KiB.
    sed -e "s|@VERSION@|$VERSION|" -e "s|@ARCH@|$ARCH|" -e "s|@MAINTAINER@|$MAINTAINER|" \
        -e "s|@PYVER@|$PYVER|" -e "s|@INSTALLED_SIZE@|$1|" -e "s|@PACKAGE@|$PACKAGE|" \
        "$HERE/control.in" | awk -v rel="$RELATIONS" -v desc="$ACCEL_DESCRIPTION" \
        '$0 == "@RELATIONS@" { print rel; next } $0 == "@ACCEL_DESCRIPTION@" { print desc; next } { print }'
}
if [ "${DEB_CONTROL_ONLY:-}" = 1 ]; then
    control 0
    exit 0
fi

STAGE=$OUT/stage
VENV_DIR=/opt/hearth/venv
VENV=$STAGE$VENV_DIR
rm -rf "$STAGE" "$DEB"
mkdir -p "$STAGE" "$DIST" "$WHEELHOUSE"
umask 022

step "venv for python$PYVER at $VENV_DIR"
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

# The two packages as wheels (build/dist), made with the venv's own pip.
sh packaging/build_wheels.sh "$VENV/bin/python" >/dev/null

install_offline() {
    # shellcheck disable=SC2086
    $PIP install --no-index --no-compile --find-links "$DIST" --find-links "$WHEELHOUSE" \
        -c constraints.txt "hearth-gateway==$VERSION" "hearth-device-sdk==$SDK_VERSION" &&
    $PIP install --no-index --no-compile --no-deps --find-links "$WHEELHOUSE" "$RAPIDOCR"
}
if ! install_offline 2>/dev/null; then
    step "filling $WHEELHOUSE from the package index (pinned by constraints.txt)"
    $PIP wheel -q -w "$WHEELHOUSE" --find-links "$DIST" -c constraints.txt \
        "hearth-gateway==$VERSION" "hearth-device-sdk[local]==$SDK_VERSION"
    $PIP download --no-deps -d "$WHEELHOUSE" -c constraints.txt "$RAPIDOCR"
    # Our own wheels live in build/dist, not in the cache of other people's.
    rm -f "$WHEELHOUSE"/hearth_device_sdk-*.whl "$WHEELHOUSE"/hearth_gateway-*.whl
    install_offline
fi
if [ "$ACCEL" = openvino ]; then
    # Both builds install `import onnxruntime`: the plain one out, the accelerated one in, as
    # scripts/accel_venv.sh does for `make openvino`.
    step "onnxruntime-openvino in place of onnxruntime"
    $PIP uninstall -y onnxruntime
    # shellcheck disable=SC2086
    $PIP install --no-index --no-compile --find-links "$WHEELHOUSE" -c constraints-openvino.txt \
        onnxruntime-openvino 2>/dev/null || {
        $PIP download --no-deps -d "$WHEELHOUSE" -c constraints-openvino.txt onnxruntime-openvino
        $PIP install --no-index --no-compile --find-links "$WHEELHOUSE" \
            -c constraints-openvino.txt onnxruntime-openvino
    }
fi
# Tab completion for hearth-gateway (argcomplete is in the venv): bash-completion loads the
# file named after the command on its first <Tab>, fish its vendor file. zsh users source
# `hearth-gateway completion zsh` themselves: argcomplete's zsh code is not an autoload function.
step "shell completion"
BASH_COMPLETIONS=$STAGE/usr/share/bash-completion/completions
FISH_COMPLETIONS=$STAGE/usr/share/fish/vendor_completions.d
mkdir -p "$BASH_COMPLETIONS" "$FISH_COMPLETIONS"
"$VENV/bin/python" -m hearth_gateway.cli completion bash > "$BASH_COMPLETIONS/hearth-gateway"
"$VENV/bin/python" -m hearth_gateway.cli completion fish > "$FISH_COMPLETIONS/hearth-gateway.fish"
# The package manages this venv; nobody should pip-install into it, so pip does not ship.
"$VENV/bin/python" -m pip uninstall -q -y pip setuptools >/dev/null 2>&1 || true
rm -rf "$VENV/bin/pip" "$VENV/bin/pip3" "$VENV/bin/pip$PYVER"

# A venv is not relocatable: scripts' #! lines, activate and pyvenv.cfg name the directory it
# was made in. Point them at where it will be installed.
for f in "$VENV"/bin/* "$VENV/pyvenv.cfg"; do
    if [ -f "$f" ] && [ ! -L "$f" ] && grep -qF "$STAGE" "$f"; then
        sed -i "s|$STAGE||g" "$f"
    fi
done
step "byte-code"
# Byte-code compiled now, so that dpkg owns every file (a root user running hearth-gateway
# would otherwise leave __pycache__ files behind), with the installed paths in tracebacks.
# checked-hash: valid whatever mtimes the files get when unpacked.
"$PYTHON" -m compileall -q -j 0 --invalidation-mode checked-hash -s "$STAGE" -p / \
    "$VENV/lib" >/dev/null
if grep -rlF "$STAGE" "$STAGE" >/dev/null; then
    echo "build_deb: the staging path is still named in:" >&2
    grep -rlF "$STAGE" "$STAGE" >&2
    exit 1
fi

# The unit as it is in the repository, and a vendor drop-in that adds the default config.
install -D -m 0644 systemd/hearth-gateway.service "$STAGE/lib/systemd/system/hearth-gateway.service"
exec_start=$(grep '^ExecStart=' systemd/hearth-gateway.service)
case $exec_start in
    "ExecStart=$VENV_DIR/bin/hearth-gateway run "*) ;;
    *) echo "build_deb: unexpected ExecStart in systemd/hearth-gateway.service: $exec_start" >&2
       exit 1 ;;
esac
mkdir -p "$STAGE/lib/systemd/system/hearth-gateway.service.d"
{
    echo "# Installed by the hearth-gateway package: the unit's command with the default config"
    echo "# /etc/hearth/gateway.toml (a conffile: edit it, upgrades keep your changes). Options"
    echo "# that go in \$HEARTH_GATEWAY_OPTS still override it (docs/systemd.md)."
    echo "[Service]"
    echo "ExecStart="
    echo "$exec_start" | sed "s| run | run --config /etc/hearth/gateway.toml |"
} > "$STAGE/lib/systemd/system/hearth-gateway.service.d/debian.conf"
install -D -m 0644 "$HERE/gateway.toml" "$STAGE/etc/hearth/gateway.toml"
install -D -m 0644 docs/systemd.md "$STAGE/opt/hearth/docs/systemd.md"
install -D -m 0644 docs/install.md "$STAGE/opt/hearth/docs/install.md"
install -D -m 0644 systemd/cloud-tier.conf "$STAGE/opt/hearth/systemd/cloud-tier.conf"
install -D -m 0644 "$HERE/copyright" "$STAGE/usr/share/doc/hearth-gateway/copyright"
mkdir -p "$STAGE/usr/bin"
ln -s "$VENV_DIR/bin/hearth-gateway" "$STAGE/usr/bin/hearth-gateway"

step "metadata"
mkdir -p "$STAGE/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$HERE/$script" "$STAGE/DEBIAN/$script"
done
echo /etc/hearth/gateway.toml > "$STAGE/DEBIAN/conffiles"
installed_kb=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
control "$installed_kb" > "$STAGE/DEBIAN/control"
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -print0 | sort -z |
    xargs -0 md5sum | sed 's|  \./|  |') > "$STAGE/DEBIAN/md5sums"
chmod -R u+rwX,go+rX,go-w "$STAGE"

step "dpkg-deb -Z$COMPRESS -z$LEVEL"
dpkg-deb --root-owner-group -Z"$COMPRESS" -z"$LEVEL" --build "$STAGE" "$DEB" >/dev/null
rm -rf "$STAGE"
step "$DEB ($(du -h "$DEB" | cut -f1), installed ${installed_kb} KiB)"
