#!/bin/bash
# Check, and with your consent prepare, one Mac to run an mlx-kvshard rank.
#
#   bash launch/setup-mac.sh [--check] [--python PATH] [--expect-version V] [--wired-mb N]
#
# Each step prints what it found. A change is made only when you answer "y" at its
# prompt (and sudo asks for your password); --check (or no terminal to answer from)
# changes nothing. Run it on every Mac of the cluster, then from the controller:
#   mlx-kvshard launch --hostfile hosts.json --check
# whose doctor compares the Macs with each other (versions, model files, links, sleep,
# the GPU wired-memory limit, bridge0, RDMA, ring network).
set -u

PYTHON=""
EXPECT=""
WIRED_MB=""
CHECK_ONLY=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --check) CHECK_ONLY=1; shift ;;
    --python) PYTHON=${2:?--python needs a path}; shift 2 ;;
    --expect-version) EXPECT=${2:?--expect-version needs a version}; shift 2 ;;
    --wired-mb) WIRED_MB=${2:?--wired-mb needs a number of MB}; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup-mac.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -n $WIRED_MB && ! $WIRED_MB =~ ^[0-9]+$ ]]; then
  echo "setup-mac.sh: --wired-mb $WIRED_MB: give a whole number of MB" >&2
  exit 2
fi
if [[ ! -t 0 ]]; then
  CHECK_ONLY=1  # nobody to ask
fi

WARNINGS=0
step() { printf '\n== %s\n' "$1"; }
ok() { printf '   ok:   %s\n' "$1"; }
warn() { printf '   WARN: %s\n' "$1"; WARNINGS=$((WARNINGS + 1)); }
info() { printf '   %s\n' "$1"; }

# ask "question" command...: show the command, run it only on "y".
ask() {
  local question=$1
  shift
  info "to fix: $*"
  if [[ $CHECK_ONLY == 1 ]]; then
    return 1
  fi
  local answer
  read -r -p "   $question [y/N] " answer
  if [[ $answer == [yY]* ]]; then
    if "$@"; then
      ok "done"
      return 0
    fi
    warn "the command failed"
  else
    info "skipped"
  fi
  return 1
}

step "This Mac"
if [[ $(uname -s) != Darwin ]]; then
  echo "   this script prepares macOS; here is $(uname -s): nothing to do" >&2
  exit 2
fi
ok "macOS $(sw_vers -productVersion 2>/dev/null), $(uname -m), $(hostname -s)"
if [[ $(uname -m) != arm64 ]]; then
  warn "not Apple Silicon: MLX needs an M-series Mac"
fi
MEM_MB=$(( $(sysctl -n hw.memsize) / 1048576 ))
info "memory: $MEM_MB MB"

step "Python, mlx, mlx-lm and mlx-kvshard (must be the same on every Mac)"
if [[ -z $PYTHON ]]; then
  PYTHON=$(command -v python3 || true)
fi
if [[ -z $PYTHON || ! -x $PYTHON ]]; then
  warn "no Python found (give --python /path/to/venv/bin/python, the same path as the hostfile's \"python\")"
else
  VERSIONS=$("$PYTHON" - <<'EOF' 2>&1
import platform
from importlib import metadata
out = [f"python {platform.python_version()}"]
for dist in ("mlx", "mlx-lm", "mlx-kvshard"):
    try:
        out.append(f"{dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        out.append(f"{dist} MISSING")
print(", ".join(out))
EOF
)
  info "$PYTHON: $VERSIONS"
  if [[ $VERSIONS == *MISSING* ]]; then
    warn "install what is missing: $PYTHON -m pip install mlx mlx-lm, then mlx-kvshard from the same checkout or wheel as the other Macs"
  fi
  if [[ -n $EXPECT ]]; then
    if [[ $VERSIONS == *"mlx-kvshard $EXPECT"* ]]; then
      ok "mlx-kvshard $EXPECT as expected"
    else
      warn "expected mlx-kvshard $EXPECT: install that version here"
    fi
  else
    info "compare this line with the other Macs' (the doctor does: mlx-kvshard launch --check)"
  fi
fi

step "Thunderbolt Bridge (bridge0 must not hold the Thunderbolt ports the ring uses)"
if ifconfig bridge0 >/dev/null 2>&1; then
  BRIDGE=$(ifconfig bridge0)
  MEMBERS=$(awk '/member:/ {print $2}' <<<"$BRIDGE" | tr '\n' ' ')
  if [[ $(head -1 <<<"$BRIDGE") == *"<UP"* && -n $MEMBERS ]]; then
    warn "bridge0 is up and holds $MEMBERS: the addresses of the ring's cables end up on it"
    ask "Take bridge0 down now (until the next reboot)?" sudo ifconfig bridge0 down
    if networksetup -listallnetworkservices 2>/dev/null | grep -qx "Thunderbolt Bridge"; then
      ask "Disable the \"Thunderbolt Bridge\" network service for good (survives reboots)?" \
        sudo networksetup -setnetworkserviceenabled "Thunderbolt Bridge" off
    fi
  else
    ok "bridge0 is down or holds no port"
  fi
else
  ok "no bridge0"
fi
info "Thunderbolt addresses: mlx.distributed_config --over thunderbolt --auto-setup (README, step 3) sets them"

step "RDMA over Thunderbolt 5 (only for the jaccl backends)"
if command -v ibv_devices >/dev/null 2>&1 && ibv_devices 2>/dev/null | grep -q rdma_; then
  ok "RDMA devices: $(ibv_devices | awk '/rdma_/ {print $1}' | tr '\n' ' ')"
else
  info "no rdma_* device. For jaccl (macOS 26.2 or later, Thunderbolt 5): restart into macOS Recovery"
  info "(hold the power button), open Utilities > Terminal, run: rdma_ctl enable, then restart."
  info "This cannot be done from here. The ring backend needs no RDMA."
fi

step "GPU wired memory (iogpu.wired_limit_mb: how much of RAM the GPU may hold)"
CURRENT=$(sysctl -n iogpu.wired_limit_mb 2>/dev/null || echo "")
if [[ -z $CURRENT ]]; then
  warn "this macOS has no iogpu.wired_limit_mb (older than macOS 14?)"
else
  if [[ $CURRENT == 0 ]]; then
    info "iogpu.wired_limit_mb = 0: the macOS default (about 2/3 of RAM up to 36 GB, 3/4 above)"
  else
    info "iogpu.wired_limit_mb = $CURRENT MB of $MEM_MB MB"
  fi
  # Leave macOS and the rest 8 GB (4 GB on Macs with 16 GB or less) unless told otherwise.
  RESERVE=$(( MEM_MB <= 16384 ? 4096 : 8192 ))
  WANT=${WIRED_MB:-$(( MEM_MB - RESERVE ))}
  if (( WANT > MEM_MB - 2048 )); then
    warn "--wired-mb $WANT leaves macOS less than 2 GB of $MEM_MB MB: not offered"
  elif [[ $CURRENT == "$WANT" ]]; then
    ok "already $WANT MB"
  else
    info "a larger limit lets bigger shards and KV caches fit (the doctor's memory check uses it)"
    ask "Set iogpu.wired_limit_mb=$WANT now (until the next reboot)?" sudo sysctl "iogpu.wired_limit_mb=$WANT"
    if ! grep -qs "^iogpu.wired_limit_mb=$WANT\$" /etc/sysctl.conf; then
      ask "Also set it at every boot (a line in /etc/sysctl.conf)?" \
        sudo sh -c "sed -i '' '/^iogpu.wired_limit_mb=/d' /etc/sysctl.conf 2>/dev/null; echo iogpu.wired_limit_mb=$WANT >> /etc/sysctl.conf"
    fi
  fi
fi

step "Sleep (a sleeping Mac is a lost rank)"
SLEEP=$(pmset -g 2>/dev/null | awk '$1 == "sleep" {print $2}')
if [[ -z $SLEEP ]]; then
  warn "pmset did not report the sleep setting"
elif [[ $SLEEP == 0 ]]; then
  ok "system sleep is off"
else
  warn "the Mac sleeps after $SLEEP minute(s) idle"
  ask "Turn system sleep off (pmset -a sleep 0; the display may still sleep)?" sudo pmset -a sleep 0
fi
if [[ $(pmset -g 2>/dev/null | awk '$1 == "autorestart" {print $2}') != 1 ]]; then
  info "after a power cut this Mac stays off; to start again by itself: sudo pmset -a autorestart 1"
fi

step "Remote Login (the controller starts the rank over ssh)"
if nc -z -G 2 127.0.0.1 22 >/dev/null 2>&1; then
  ok "sshd answers on port 22"
else
  warn "nothing answers on port 22: System Settings > General > Sharing > Remote Login"
fi

step "Keep the cluster network private"
info "MLX's ring and jaccl ports accept whoever connects: keep the Thunderbolt links to the"
info "cluster's Macs, and do not put ring addresses on a network others reach. The doctor"
info "warns when a ring address is on the interface of the default route."

printf '\n%s warning(s). Next, from the controller: mlx-kvshard launch --hostfile hosts.json --check\n' "$WARNINGS"
if [[ $CHECK_ONLY == 1 ]]; then
  echo "(check only: nothing was changed)"
fi
[[ $WARNINGS == 0 ]]
