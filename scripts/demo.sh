#!/usr/bin/env bash
# hv's main job on real guests, end to end (run as root on Debian 12):
#   1. set up (scripts/setup.sh: packages, .venv, guest kernel and image);
#   2. launch an idle guest and an active one (a toucher with a 120 MiB working set);
#   3. create host swap if there is none (the working-set sampler needs it);
#   4. run `hv run` for DURATION seconds (default 90) on a 500 MiB pool in the soft
#      state: working sets are sampled, the idle memory tax moves memory from the
#      idle guest to the active one through the balloon; `hv status` every 20 s;
#   5. report page sharing (`hv share`), then stop hv, the guests and remove the swap
#      file it created.  The event log stays in $HV_STATE_DIR/daemon/events.jsonl.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
duration=${1:-90}
hv="$repo/.venv/bin/hv"

bash "$repo/scripts/setup.sh"
export HV_RUN_DIR=${HV_RUN_DIR:-/run/hv/demo}
work=$(mktemp -d --suffix=.hv-demo)
made_swap=""
cleanup() {
    [ -n "${hvpid:-}" ] && kill -INT "$hvpid" 2>/dev/null && wait "$hvpid" 2>/dev/null || true
    "$hv" stop --all >/dev/null 2>&1 || true
    [ -n "$made_swap" ] && "$hv" swap remove --path "$work/swapfile" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

"$hv" launch -n 1 -p idle -m 256M -w idle
"$hv" launch -n 1 -p active -m 256M -w toucher --param alloc_mib=150 --param ws=120
if [ -z "$(swapon --noheadings 2>/dev/null)" ]; then
    "$hv" swap create 1G --path "$work/swapfile" && made_swap=1
fi
cat > "$work/hv.toml" <<TOML
[host]
managed = "500M"
sample_period_s = 10
sample_pages = 200

[vm.idle1]
socket = "$HV_RUN_DIR/idle1/qmp.sock"
min = "128M"
max = "256M"
shares = 1000

[vm.active1]
socket = "$HV_RUN_DIR/active1/qmp.sock"
min = "128M"
max = "256M"
shares = 1000
TOML
# Let the toucher fill its memory before hv starts (its console says so).
for ((i = 0; i < 120; i++)); do
    grep -q 'event=toucher_filled' "$HV_RUN_DIR/active1/console.log" 2>/dev/null && break
    sleep 0.5
done
"$hv" run --config "$work/hv.toml" --force-state soft &
hvpid=$!
for ((t = 20; t <= duration; t += 20)); do
    sleep 20
    kill -0 "$hvpid" 2>/dev/null || { echo "demo: hv run exited early" >&2; exit 1; }
    echo "--- after ${t} s"
    "$hv" status idle1 active1 || true
done
kill -INT "$hvpid"; wait "$hvpid"; hvpid=""
echo "--- page sharing"
"$hv" share idle1 active1
