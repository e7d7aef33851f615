#!/bin/sh
# Install the package into a throwaway copy of this machine, use it, purge it, and list what
# is left behind. As root, on a Debian machine with the package's dependencies installed:
#
#   packaging/deb/try_install.sh build/deb/hearth-gateway_*.deb
#
# Isolation (no container runtime or systemd is needed): `unshare --mount --pid --net` gives a
# mount namespace, a PID namespace and a network namespace with only a loopback; in it an
# overlay mount puts a tmpfs over this machine's root, and smoke.py runs with that as its root.
# dpkg, the maintainer scripts and the gateway act on the real Debian system underneath, but
# every write lands in the tmpfs and vanishes when the namespace ends. systemd is not PID 1
# there, so smoke.py does what it would: StateDirectory=, DynamicUser= (an unprivileged UID),
# UMask=, Environment=, NOTIFY_SOCKET for Type=notify, then runs the unit's ExecStart= line.
#
# After purge the overlay's upper directory holds exactly what the whole episode changed:
# printed as "LEFTOVER <type> <path>" lines (type as find -printf %y; "whiteout" = deleted).
set -eu
#   packaging/deb/try_install.sh --probe    exit 0 if this machine allows all that, else say why
if [ "${1:-}" != --inside ]; then
    [ "$(id -u)" = 0 ] || { echo "try_install: needs root (namespaces, overlay, dpkg)" >&2; exit 1; }
    if [ "$1" = --probe ]; then deb=--probe; else deb=$(readlink -f "$1"); fi
    exec unshare --mount --pid --net --fork --propagation private sh "$0" --inside "$deb"
fi
deb=$2
here=$(cd "$(dirname "$0")" && pwd)

t=$(mktemp -d)
mount -t tmpfs -o mode=0700 tmpfs "$t"
mkdir "$t/upper" "$t/work" "$t/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$t/upper,workdir=$t/work" "$t/root"
mount -t proc proc "$t/root/proc"
mount --rbind /sys "$t/root/sys"
mount --rbind /dev "$t/root/dev"
mount -t tmpfs tmpfs "$t/root/dev/shm"
mount -t tmpfs -o mode=1777 tmpfs "$t/root/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$t/root/run"
ip link set lo up
if [ "$deb" = --probe ]; then
    exit 0
fi

cp "$deb" "$t/root/tmp/hearth-gateway.deb"
cp "$here/smoke.py" "$t/root/tmp/smoke.py"
rc=0
# pivot_root in a nested mount namespace, not chroot: the kernel refuses user namespaces to a
# chrooted process, and the gateway's workers make one to get a network namespace of their own.
unshare --mount --propagation private sh -c \
    'cd "$1" && pivot_root . mnt && umount -l /mnt && exec /usr/bin/python3 /tmp/smoke.py "$2"' \
    - "$t/root" /tmp/hearth-gateway.deb || rc=$?

# What the episode left: every entry of the upper layer, except directories that exist below
# (copied up only because something inside them changed); a new directory is one line.
/usr/bin/python3 - "$t/upper" <<'PY'
import os, stat, sys
upper = sys.argv[1]
new_dirs = []
for top, dirs, files in os.walk(upper):
    dirs.sort()
    for name in sorted(dirs) + sorted(files):
        path = os.path.join(top, name)[len(upper):]
        if any(path.startswith(d + "/") for d in new_dirs):
            continue
        st = os.lstat(upper + path)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            kind = "whiteout"
        elif stat.S_ISDIR(st.st_mode):
            if os.path.isdir(path) and not os.path.islink(path):
                continue
            new_dirs.append(path)
            kind = "d"
        else:
            kind = "l" if stat.S_ISLNK(st.st_mode) else "s" if stat.S_ISSOCK(st.st_mode) else "f"
        print("LEFTOVER", kind, path)
PY
exit "$rc"
