#!/usr/bin/env bash
# Prepare this machine (as root, idempotently) for the ssh, escalation and signal tests:
# openssh-server/client, sudo, opendoas, python3 with pip and venv, iproute2 (network namespaces), tmux (a real terminal's Ctrl-C),
# the programs the terminal tests drive in it (vi, top, git), a nix daemon (the socket tests), and systemd with
# dbus (the systemd tests boot it in namespaces of their own; util-linux's unshare, nsenter and runuser start it) installed;
# the user remowt-test with a known password, allowed to escalate with sudo and doas, each asking for the
# password every time.
# Does not start sshd: the tests start their own.
set -euo pipefail

TEST_USER=remowt-test
TEST_PASSWORD=remowt-test-password

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-test-host.sh: must run as root (it installs packages and creates the user $TEST_USER)" >&2
    exit 1
fi

missing=0
for path in /usr/sbin/sshd /usr/bin/ssh /usr/bin/ssh-keygen /usr/bin/sudo /usr/bin/doas /usr/bin/python3 \
    /lib/systemd/systemd /usr/bin/dbus-daemon /usr/bin/unshare /usr/bin/nsenter /usr/sbin/runuser; do
    [ -x "$path" ] || missing=1
done
command -v ip >/dev/null || missing=1
for program in tmux vi top git nix-daemon; do
    command -v "$program" >/dev/null || missing=1
done
# pip for the test command's install, venv (ensurepip) for the README's set-up command that test_readme runs
python3 -m pip --version >/dev/null 2>&1 || missing=1
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing=1
if [ "$missing" -eq 1 ]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openssh-server openssh-client sudo opendoas python3 python3-pip python3-venv iproute2 tmux vim-tiny procps \
        git nix-bin systemd dbus util-linux
fi

# The user: a home, bash, a password (which also unlocks the account, so sshd lets it log in with a key).
if ! id -u "$TEST_USER" >/dev/null 2>&1; then
    useradd --create-home --home-dir "/home/$TEST_USER" --shell /bin/bash "$TEST_USER"
fi
echo "$TEST_USER:$TEST_PASSWORD" | chpasswd

# sudo: every call asks for the password (timestamp_timeout=0), three tries, never a lecture.
sudoers_tmp=$(mktemp)
trap 'rm -f "$sudoers_tmp"' EXIT
cat >"$sudoers_tmp" <<EOF
# Written by remowt scripts/setup-test-host.sh for the escalation tests.
Defaults:$TEST_USER timestamp_timeout=0
Defaults:$TEST_USER passwd_tries=3
Defaults:$TEST_USER lecture=never
$TEST_USER ALL=(ALL:ALL) ALL
EOF
visudo -cqf "$sudoers_tmp"
install -o root -g root -m 0440 "$sudoers_tmp" "/etc/sudoers.d/$TEST_USER"

# doas: asks every time (no persist, no nopass); other rules are kept.
doas_rule="permit $TEST_USER as root"
touch /etc/doas.conf
if ! grep -qxF "$doas_rule" /etc/doas.conf; then
    # doas needs the file to end with a newline before the appended rule.
    if [ -s /etc/doas.conf ] && [ -n "$(tail -c1 /etc/doas.conf)" ]; then
        echo >>/etc/doas.conf
    fi
    echo "$doas_rule" >>/etc/doas.conf
fi
chown root:root /etc/doas.conf
chmod 0600 /etc/doas.conf
doas -C /etc/doas.conf
