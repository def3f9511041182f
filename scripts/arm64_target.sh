#!/usr/bin/env bash
# An arm64 Debian target on this x86 machine, for `validate.targets` (docs/validation.md, "Try your build on
# an ARM target without a board"). Debian's qemu-user-static runs the arm64 programs (binfmt_misc); the root
# filesystem comes from Debian's packages (debootstrap) and the runtimes from PyPI's aarch64 wheels.
#
#   scripts/arm64_target.sh build    # once (about 10 minutes): root filesystem, Python, runtimes, sshd, keys
#                                    # ('download' alone does its network-bound first part: fetch and unpack)
#   scripts/arm64_target.sh start    # sshd on 127.0.0.1:<port>; prints the target and the ssh settings
#   scripts/arm64_target.sh status   # built? running? which runtimes it has
#   scripts/arm64_target.sh stop     # ends sshd and unmounts /proc, /sys and /dev of the root filesystem
#
# Needs root (debootstrap, chroot, mount) and Debian's apt for the two tools when they are missing.
# Settings (environment): EDGESMITH_ARM64_HOME (default ~/.cache/edgesmith/arm64-bookworm), EDGESMITH_ARM64_PORT
# (default: a free port), EDGESMITH_DEBIAN_MIRROR (default http://deb.debian.org/debian), EDGESMITH_BINFMT_DIR
# (default /proc/sys/fs/binfmt_misc). Exit codes: 0 done, 1 a step failed, 2 this machine cannot run arm64
# programs (no root, no binfmt_misc) or a usage error.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE="bookworm"
HOME_DIR="${EDGESMITH_ARM64_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/edgesmith/arm64-$SUITE}"
ROOTFS="$HOME_DIR/rootfs"
BINFMT_DIR="${EDGESMITH_BINFMT_DIR:-/proc/sys/fs/binfmt_misc}"
MIRROR="${EDGESMITH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3,python3-venv,python3-pip,openssh-server,openssh-sftp-server,ca-certificates"
# The device suite's needs, pinned by constraints.txt; each is tried on its own (not every runtime has an
# aarch64 wheel) and the ones that installed are listed in $HOME_DIR/runtimes.txt.
WHEELS=(numpy pytest onnxruntime openvino ai-edge-litert tflite_micro)
# The runtimes read the CPU from /proc and /sys (OpenVINO hangs without /proc and crashes without /sys). Under
# qemu-user /proc/cpuinfo describes the x86 host, and ONNX Runtime's ARM cpuinfo parser crashes on it (a
# segmentation fault on import), so an arm64 one is bound over it: a Cortex-A76 (Raspberry Pi 5) with the
# host's number of cores.
MOUNTS=(proc sys dev cpuinfo)
# The CPU qemu emulates, the same Cortex-A76 (ARMv8.2 with dot product, no SVE or int8 matrix multiply). qemu's
# default, "max", offers every extension it knows, and with it LiteRT's INT8 model gave wrong answers (top-1
# 0.25 instead of 0.86 on the default build; right with cortex-a76 or neoverse-n1): not a board anyone has.
# qemu reads QEMU_CPU at every exec, so it is set for sshd, and in its sessions by SetEnv.
export QEMU_CPU=cortex-a76

say() { echo "arm64_target: $*" >&2; }
die() { local code=$1; shift; say "$*"; exit "$code"; }

need_root() {
    [ "$(id -u)" = 0 ] || die 2 "needs root (debootstrap, chroot and mount do); run it with sudo."
}

ensure_tools() {
    local need=()
    command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
    command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
    command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
    [ ${#need[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die 2 "needs ${need[*]} and this machine has no apt-get; install them from your distribution."
    say "installing ${need[*]} from Debian"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || die 1 "apt-get install ${need[*]} failed; run it by hand to see why."
}

# binfmt_misc tells the kernel to hand arm64 programs to qemu-aarch64-static. The registration is kernel-wide,
# so a container needs it from its host (or --privileged); without it nothing arm64 can run here.
ensure_binfmt() {
    local entry="$BINFMT_DIR/qemu-aarch64" conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    if [ ! -e "$BINFMT_DIR/register" ] && [ "$BINFMT_DIR" = /proc/sys/fs/binfmt_misc ]; then
        mount -t binfmt_misc binfmt_misc "$BINFMT_DIR" 2>/dev/null || true
    fi
    if [ ! -e "$entry" ] && [ -w "$BINFMT_DIR/register" ] && [ -r "$conf" ]; then
        cat "$conf" > "$BINFMT_DIR/register" 2>/dev/null || true
    fi
    if [ ! -e "$entry" ] || ! grep -q '^enabled' "$entry"; then
        die 2 "binfmt_misc cannot run arm64 programs here: $BINFMT_DIR has no enabled qemu-aarch64 entry and \
registering one failed (the folder is not mounted, not writable, or lacks 'register'). In a container the \
registration must come from the host: run 'docker run --privileged' or, on the host, install qemu-user-static \
(Debian: apt-get install qemu-user-static binfmt-support); then run this again."
    fi
    # F (fix binary): the kernel opened qemu at registration, so it works inside the chroot too.
    grep -q '^flags:.*F' "$entry" || cp "$(command -v qemu-aarch64-static)" "$ROOTFS/usr/bin/" 2>/dev/null || true
}

mount_fs() {
    local m
    for m in "${MOUNTS[@]}"; do
        [ "$m" = cpuinfo ] && m=proc/cpuinfo
        mountpoint -q "$ROOTFS/$m" && continue
        [ "$m" = proc/cpuinfo ] && m=cpuinfo
        case $m in
            proc) mount -t proc proc "$ROOTFS/proc" ;;
            sys) mount -t sysfs sys "$ROOTFS/sys" ;;
            dev) mount --bind /dev "$ROOTFS/dev" ;;
            cpuinfo) arm64_cpuinfo > "$HOME_DIR/cpuinfo"; mount --bind "$HOME_DIR/cpuinfo" "$ROOTFS/proc/cpuinfo" ;;
        esac
    done
}

arm64_cpuinfo() {
    local i
    for ((i = 0; i < $(nproc); i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$i"
    done
}

umount_fs() {
    local m
    for m in proc/cpuinfo dev/pts dev sys proc; do  # dev/pts: what debootstrap may leave
        if mountpoint -q "$ROOTFS/$m"; then umount "$ROOTFS/$m" || umount -l "$ROOTFS/$m"; fi
    done
}

in_rootfs() { chroot "$ROOTFS" /usr/bin/env -i QEMU_CPU="$QEMU_CPU" PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root \
    PIP_CERT=/etc/ssl/certs/edgesmith-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    ${PIP_INDEX_URL:+PIP_INDEX_URL=$PIP_INDEX_URL} "$@"; }

install_wheels() {
    # The host's CA bundle (a proxy's CA included) so that pip in the rootfs reaches PyPI as the host does.
    cp "${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" "$ROOTFS/etc/ssl/certs/edgesmith-host-ca.crt"
    grep -v '^\s*#' "$HERE/constraints.txt" > "$ROOTFS/root/constraints.txt"
    : > "$HOME_DIR/runtimes.txt.part"
    local wheel
    for wheel in "${WHEELS[@]}"; do
        say "pip install $wheel (aarch64 wheel, under emulation)"
        if in_rootfs python3 -m pip install -q --break-system-packages --only-binary=:all: \
                -c /root/constraints.txt "$wheel" > "$HOME_DIR/pip-$wheel.log" 2>&1; then
            echo "$wheel $(grep -i "^$wheel==" "$ROOTFS/root/constraints.txt" | cut -d= -f3)" >> "$HOME_DIR/runtimes.txt.part"
        else
            say "  no aarch64 wheel of $wheel at the pinned version ($(tail -1 "$HOME_DIR/pip-$wheel.log"))"
            echo "$wheel none" >> "$HOME_DIR/runtimes.txt.part"
        fi
    done
    mv "$HOME_DIR/runtimes.txt.part" "$HOME_DIR/runtimes.txt"
}

make_keys() {
    rm -f "$HOME_DIR/id_ed25519" "$HOME_DIR/id_ed25519.pub"
    ssh-keygen -q -t ed25519 -N "" -C edgesmith-arm64 -f "$HOME_DIR/id_ed25519"
    install -d -m 700 "$ROOTFS/root/.ssh"
    install -m 600 "$HOME_DIR/id_ed25519.pub" "$ROOTFS/root/.ssh/authorized_keys"
    rm -f "$ROOTFS"/etc/ssh/ssh_host_*
    ssh-keygen -q -t ed25519 -N "" -C edgesmith-arm64-host -f "$ROOTFS/etc/ssh/ssh_host_ed25519_key"
}

sshd_config() {
    cat > "$ROOTFS/etc/ssh/sshd_config.d/edgesmith.conf" <<EOF
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
SetEnv QEMU_CPU=$QEMU_CPU
EOF
}

# First stage: Debian's arm64 packages downloaded and unpacked (network-bound; nothing arm64 runs yet).
cmd_download() {
    need_root
    ensure_tools
    mkdir -p "$HOME_DIR"
    [ -f "$ROOTFS/debootstrap/debootstrap" ] && return 0
    umount_fs
    rm -rf "$ROOTFS" "$HOME_DIR/debootstrapped"
    say "debootstrap --foreign --arch=arm64 $SUITE (Debian packages: $PACKAGES)"
    debootstrap --foreign --arch=arm64 --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" \
        > "$HOME_DIR/debootstrap.log" 2>&1 || die 1 "debootstrap failed; see $HOME_DIR/debootstrap.log"
}

cmd_build() {
    need_root
    if [ -f "$HOME_DIR/built" ]; then say "already built in $HOME_DIR (remove it to rebuild)"; return 0; fi
    ensure_tools
    mkdir -p "$HOME_DIR"
    ensure_binfmt
    local started=$SECONDS
    [ -f "$ROOTFS/debootstrap/debootstrap" ] || [ -f "$HOME_DIR/debootstrapped" ] || cmd_download
    if [ ! -f "$HOME_DIR/debootstrapped" ]; then
        # Second stage: the arm64 maintainer scripts run, emulated (the CPU-heavy part).
        say "debootstrap --second-stage (arm64 packages configured under emulation)"
        chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >> "$HOME_DIR/debootstrap.log" 2>&1 \
            || die 1 "debootstrap --second-stage failed; see $HOME_DIR/debootstrap.log"
        touch "$HOME_DIR/debootstrapped"
    fi
    in_rootfs uname -m | grep -qx aarch64 || die 1 "the rootfs does not run as aarch64 (uname -m: $(in_rootfs uname -m))"
    mount_fs
    trap umount_fs EXIT
    install_wheels
    make_keys
    umount_fs
    trap - EXIT
    echo $((SECONDS - started)) > "$HOME_DIR/build_seconds"
    touch "$HOME_DIR/built"
    say "built in $((SECONDS - started)) s: $HOME_DIR ($(du -sh "$ROOTFS" | cut -f1)); runtimes:"
    sed 's/^/  /' "$HOME_DIR/runtimes.txt" >&2
}

running_pid() {
    local pid
    pid=$(cat "$ROOTFS/run/sshd.pid" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

print_target() {
    local port
    port=$(cat "$HOME_DIR/port")
    echo "ssh://root@127.0.0.1:$port?emulated=true"
    say "validate with: --set 'validate.targets=[local,\"ssh://root@127.0.0.1:$port?emulated=true\"]'" \
        "--set validate.ssh.key_file=$HOME_DIR/id_ed25519 --set validate.ssh.known_hosts=$HOME_DIR/known_hosts"
}

cmd_start() {
    need_root
    [ -f "$HOME_DIR/built" ] || die 2 "no arm64 root filesystem in $HOME_DIR yet; run '$0 build' first."
    ensure_binfmt
    mount_fs
    if running_pid >/dev/null; then print_target; return 0; fi
    local port=${EDGESMITH_ARM64_PORT:-$(free_port)} host_key
    mkdir -p "$ROOTFS/run/sshd"
    sshd_config
    host_key=$(cut -d' ' -f1,2 "$ROOTFS/etc/ssh/ssh_host_ed25519_key.pub")
    echo "[127.0.0.1]:$port $host_key" > "$HOME_DIR/known_hosts"
    echo "$port" > "$HOME_DIR/port"
    # The arm64 sshd itself (emulated), listening on loopback only; it forks a session per connection.
    chroot "$ROOTFS" /usr/sbin/sshd -p "$port" -o ListenAddress=127.0.0.1 -o PidFile=/run/sshd.pid \
        -E /var/log/edgesmith-sshd.log || die 1 "sshd did not start; see $ROOTFS/var/log/edgesmith-sshd.log"
    local i
    for i in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then print_target; return 0; fi
        sleep 0.2
    done
    die 1 "sshd does not answer on 127.0.0.1:$port; see $ROOTFS/var/log/edgesmith-sshd.log"
}

cmd_stop() {
    need_root
    local pid
    if pid=$(running_pid); then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        say "sshd stopped"
    else
        say "not running"
    fi
    rm -f "$ROOTFS/run/sshd.pid"
    [ -d "$ROOTFS" ] && umount_fs
    return 0
}

cmd_status() {
    if [ ! -f "$HOME_DIR/built" ]; then echo "not built ($HOME_DIR)"; return 0; fi
    echo "built: $HOME_DIR (in $(cat "$HOME_DIR/build_seconds" 2>/dev/null || echo '?') s)"
    sed 's/^/  /' "$HOME_DIR/runtimes.txt"
    if running_pid >/dev/null; then echo "running: $(print_target 2>/dev/null)"; else echo "stopped"; fi
}

case "${1:-}" in
    download) cmd_download ;;
    build) cmd_build ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) die 2 "usage: $0 download|build|start|stop|status (see the comment at the top of this script)" ;;
esac
