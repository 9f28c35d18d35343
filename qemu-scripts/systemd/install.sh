#!/bin/sh
# Install vhost-user-tap as per-VM systemd services (run as root, from anywhere in the repository).
#
# Usage: cargo build --release && qemu-scripts/systemd/install.sh
#   VUT_BINARY=path  the daemon binary to install (default: target/release/vhost-user-tap, or
#                    $CARGO_TARGET_DIR/release/vhost-user-tap when that is set)
#   DESTDIR=dir      stage everything under dir (packaging); no user is created, systemd is not
#                    reloaded
#
# Installs:
#   /usr/libexec/vhost-user-tap                 the daemon
#   /usr/libexec/vhost-user-tap-prepare         the units' privileged ExecStartPre (creates the tap)
#   /etc/systemd/system/vhost-user-tap@.socket  one listening socket per VM
#   /etc/systemd/system/vhost-user-tap@.service one daemon per VM
#   /usr/lib/sysusers.d/vhost-user-tap.conf     the system user and group vhost-user-tap
#   /etc/vhost-user-tap/vm1.conf.example        per-VM settings, to copy to /etc/vhost-user-tap/<vm>.conf
# and creates the user vhost-user-tap (systemd-sysusers, or useradd without systemd).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dest=${DESTDIR:-}
binary=${VUT_BINARY:-${CARGO_TARGET_DIR:-$repo/target}/release/vhost-user-tap}

if [ ! -x "$binary" ]; then
    echo "install.sh: no daemon binary at $binary: run \`cargo build --release\` first (or set VUT_BINARY)" >&2
    exit 1
fi
if [ -z "$dest" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or set DESTDIR to stage the files)" >&2
    exit 1
fi

install -D -m 0755 "$binary" "$dest/usr/libexec/vhost-user-tap"
install -D -m 0755 "$here/vhost-user-tap-prepare" "$dest/usr/libexec/vhost-user-tap-prepare"
install -D -m 0644 "$here/vhost-user-tap@.socket" "$dest/etc/systemd/system/vhost-user-tap@.socket"
install -D -m 0644 "$here/vhost-user-tap@.service" "$dest/etc/systemd/system/vhost-user-tap@.service"
install -D -m 0644 "$here/vhost-user-tap.sysusers" "$dest/usr/lib/sysusers.d/vhost-user-tap.conf"
install -d -m 0755 "$dest/etc/vhost-user-tap"
install -m 0644 "$here/vm1.conf" "$dest/etc/vhost-user-tap/vm1.conf.example"

if [ -n "$dest" ]; then
    echo "install.sh: staged under $dest (no user created, systemd not reloaded)"
    exit 0
fi

if ! getent passwd vhost-user-tap >/dev/null; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers vhost-user-tap.conf
    else
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "vhost-user-tap network backend" vhost-user-tap
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

cat <<'EOF'
vhost-user-tap installed. For a VM named vm1:
  cp /etc/vhost-user-tap/vm1.conf.example /etc/vhost-user-tap/vm1.conf   # then edit it
  systemctl enable --now vhost-user-tap@vm1.socket vhost-user-tap@vm1.service
  qemu-system-x86_64 ... -chardev socket,id=chr0,path=/run/vhost-user-tap/vm1.sock ...
QEMU must run as root or as a member of the group vhost-user-tap.
EOF
