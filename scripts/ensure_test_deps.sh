#!/usr/bin/env bash
# System packages the tests need: an OpenSSH server (tests/test_ssh*.py start their own sshd on 127.0.0.1)
# and Chromium (tests/test_report*.py render report.html headless). Installed from Debian when missing;
# a machine without root or apt simply skips those tests with a reason.
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_test_deps: missing ${need[*]} (no root/apt-get here); the tests that need them will be skipped." >&2
    exit 0
fi
echo "ensure_test_deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
