#!/usr/bin/env bash
# Ferry bootstrap: installs what Ferry needs on a Debian machine, then runs one action.
#   scripts/bootstrap.sh console   install, then open the console on the lab
#   scripts/bootstrap.sh test      install, then run the whole test suite
#   scripts/bootstrap.sh install   install only
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
action=${1:-install}
shift || true

# System packages Ferry needs on the machine it runs on (and the lab/test hosts). The test suite
# also makes ext4 filesystems (e2fsprogs), loop devices and mounts (mount), private mount
# namespaces (util-linux), and loads the zsh completion in zsh: without them those tests skip,
# and the run says so at its end. The network lab (network namespaces) fences itself off with
# nftables (nft) and uses iproute2 (ip); it hands out addresses on its VM network with dnsmasq
# (dnsmasq-base: the program only, no system service). The migration tests' source server is a
# Debian system the harness builds from Debian packages with mmdebstrap. The health checks' tests run
# a real Nagios plugin (check_disk) from monitoring-plugins-basic as a configured check.
PKGS=(openssh-server openssh-client qemu-system-x86 qemu-utils rsync tmux python3-venv
      ca-certificates xz-utils cpio e2fsprogs mount util-linux zsh nftables iproute2 dnsmasq-base
      mmdebstrap monitoring-plugins-basic)
# Map each package to a file that proves it is installed.
declare -A PROOF=(
  [openssh-server]=/usr/sbin/sshd [openssh-client]=/usr/bin/ssh
  [qemu-system-x86]=/usr/bin/qemu-system-x86_64 [qemu-utils]=/usr/bin/qemu-img
  [rsync]=/usr/bin/rsync [tmux]=/usr/bin/tmux [nftables]=/usr/sbin/nft [iproute2]=/usr/sbin/ip [dnsmasq-base]=/usr/sbin/dnsmasq [python3-venv]=
  [ca-certificates]=/etc/ssl/certs [xz-utils]=/usr/bin/xz [cpio]=/usr/bin/cpio
  [e2fsprogs]=/sbin/mkfs.ext4 [mount]=/sbin/losetup [util-linux]=/usr/bin/unshare [zsh]=/usr/bin/zsh
  [mmdebstrap]=/usr/bin/mmdebstrap [monitoring-plugins-basic]=/usr/lib/nagios/plugins/check_disk
)
missing=()
for p in "${PKGS[@]}"; do
  proof=${PROOF[$p]}
  if [ -n "$proof" ]; then
    [ -e "$proof" ] || missing+=("$p")
  else
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  fi
done
# A Python interpreter that already carries venv (pyenv, etc.) does not need python3-venv.
if [[ " ${missing[*]} " == *" python3-venv "* ]] && python3 -c 'import venv, ensurepip' 2>/dev/null; then
  missing=("${missing[@]/python3-venv}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "ferry bootstrap: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "ferry bootstrap: missing system packages: ${missing[*]}" >&2
    echo "hint: run as root:  apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
# Debian's openssh-server package starts the machine's own sshd; Ferry never needs it.
# Tests start their own sshd on loopback with throw-away keys.

py=${FERRY_PYTHON:-python3}
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "ferry bootstrap: Python 3.11 or newer is needed ($py is $("$py" --version 2>&1))" >&2; exit 1; }
venv="$here/.venv"
stamp="$venv/.ferry-installed"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "ferry bootstrap: installing Python packages into .venv (log: .venv/pip.log)"
  if ! { "$venv/bin/python" -m pip install --upgrade pip &&
         "$venv/bin/python" -m pip install -e ".[test]"; } >"$venv/pip.log" 2>&1; then
    tail -n 20 "$venv/pip.log" >&2
    echo "ferry bootstrap: pip install failed (full log: $venv/pip.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi

# The live image the lab's VMs boot (cached and versioned in the workspace; rebuilt only
# when its recipe changes). The test suite builds its own copy in its cache.
build_image() {
  local ws_args=()
  if [ -n "${FERRY_WORKSPACE:-}" ]; then ws_args=(--workspace "$FERRY_WORKSPACE"); fi
  if ! "$venv/bin/ferry" "${ws_args[@]}" lab image build 2>"$venv/image.log"; then
    if grep -q "apt-get update" "$venv/image.log" && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && "$venv/bin/ferry" "${ws_args[@]}" lab image build 2>"$venv/image.log" && return 0
    fi
    tail -n 3 "$venv/image.log" >&2
    echo "ferry bootstrap: the live image was not built; VMs cannot start until \`ferry lab image build\` works" >&2
  fi
}

# Shell completion for bash and zsh, generated from the CLI's parser (`ferry completion SHELL`):
# installed for every user when root, else the line that loads it is shown. Never fatal.
install_completion() {
  local ferry="$venv/bin/ferry" bash_dir=/etc/bash_completion.d zsh_dir=/usr/local/share/zsh/site-functions
  local root=0 script
  [ "$(id -u)" = 0 ] && root=1
  if [ $root = 1 ] && [ -d "$bash_dir" ] && script=$("$ferry" completion bash) &&
     printf '%s\n' "$script" 2>/dev/null > "$bash_dir/ferry"; then
    echo "ferry bootstrap: bash completion installed in $bash_dir/ferry (new shells load it)"
  else
    echo "ferry bootstrap: for bash completion, add to ~/.bashrc:  source <(\"$ferry\" completion bash)"
  fi
  command -v zsh >/dev/null || [ -d "$zsh_dir" ] || return 0
  if [ $root = 1 ] && script=$("$ferry" completion zsh) && mkdir -p "$zsh_dir" 2>/dev/null &&
     printf '%s\n' "$script" 2>/dev/null > "$zsh_dir/_ferry"; then
    echo "ferry bootstrap: zsh completion installed in $zsh_dir/_ferry (new shells load it with compinit)"
  else
    echo "ferry bootstrap: for zsh completion, add to ~/.zshrc after compinit:  eval \"\$(\"$ferry\" completion zsh)\""
  fi
}

case "$action" in
  install) build_image; install_completion; echo "ferry bootstrap: ready ($venv/bin/ferry)";;
  console) build_image; exec "$venv/bin/ferry" "$@";;
  test)
    # What some tests need beyond packages: root (tmpfs and bind mounts, loop devices, mount
    # namespaces) and the loop driver. Say up front what this run will have to skip.
    if [ "$(id -u)" = 0 ]; then
      [ -e /dev/loop-control ] || { command -v modprobe >/dev/null && modprobe loop 2>/dev/null; } || true
      [ -e /dev/loop-control ] || echo "ferry bootstrap: no loop devices here (/dev/loop-control): the tests that need one will skip" >&2
    else
      echo "ferry bootstrap: not root: the tests that mount filesystems or use loop devices will skip" >&2
    fi
    exec "$venv/bin/python" -m pytest "$@";;
  *) echo "usage: scripts/bootstrap.sh [install|console|test] [args...]" >&2; exit 2;;
esac
