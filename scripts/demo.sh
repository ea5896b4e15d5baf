#!/usr/bin/env bash
# hv's main job on real guests, end to end, under real host memory pressure (run as root
# on Debian 12):
#   1. set up (scripts/setup.sh: packages, .venv, guest kernel and image);
#   2. launch two idle guests that wrote 600 MiB each and freed it (the host still backs
#      it) and an active one (a toucher with a 200 MiB working set);
#   3. create host swap if there is none (sampler and hypervisor swap need it);
#   4. start `hv run` with the DEFAULT [host] section (the whole host, no forced state);
#      once the working sets are sampled, a helper process locks host memory (mlock)
#      until only 3 % of it is available: below the soft threshold (4 %), for real;
#   5. watch hv reclaim: the idle guests' balloons inflate, the active guest keeps its
#      working set, free memory comes back above the soft threshold; `hv status`
#      every 15 s for DURATION seconds (default 90);
#   6. release the pressure, stop hv, report page sharing (`hv share`), stop the
#      guests, remove the swap file it created.  The event log stays in
#      $HV_STATE_DIR/daemon/events.jsonl (default /var/lib/hv/daemon/events.jsonl).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
duration=${1:-90}
hv="$repo/.venv/bin/hv"
py="$repo/.venv/bin/python"

bash "$repo/scripts/setup.sh"
export HV_RUN_DIR=${HV_RUN_DIR:-/run/hv/demo}
work=$(mktemp -d --suffix=.hv-demo)
made_swap=""
cleanup() {
    [ -n "${lockpid:-}" ] && kill "$lockpid" 2>/dev/null && wait "$lockpid" 2>/dev/null || true
    [ -n "${hvpid:-}" ] && kill -INT "$hvpid" 2>/dev/null && wait "$hvpid" 2>/dev/null || true
    "$hv" stop --all >/dev/null 2>&1 || true
    [ -n "$made_swap" ] && "$hv" swap remove --path "$work/swapfile" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
avail() { awk '/MemAvailable/ {a=$2} /MemTotal/ {t=$2} END {printf "%.0f MiB (%.1f %% of the host)", a/1024, 100*a/t}' /proc/meminfo; }
console_has() { grep -q "event=$2" "$HV_RUN_DIR/$1/console.log" 2>/dev/null; }
wait_console() {
    for ((i = 0; i < 240; i++)); do console_has "$1" "$2" && return 0; sleep 0.5; done
    echo "demo: $1 never printed event=$2" >&2; exit 1
}

"$hv" launch -n 2 -p idle -m 768M -w hog --param hog_mib=600 --param hog_hold_s=1
"$hv" launch -n 1 -p active -m 512M -w toucher --param alloc_mib=220 --param ws=200
wait_console idle1 hog_freed; wait_console idle2 hog_freed; wait_console active1 toucher_filled
# Admission reserves max - min of every VM in swap: (768-160)*2 + (512-160) MiB.
if [ "$(awk '/SwapFree/ {print $2}' /proc/meminfo)" -lt $((1700 * 1024)) ]; then
    "$hv" swap create 2G --path "$work/swapfile" && made_swap=1
fi
cat > "$work/hv.toml" <<TOML
# The default [host]: all of the host's memory, the paper's thresholds (6/4/2/1 %),
# tax 0.75; only the sampling period is shortened for a short demo.
[host]
sample_period_s = 10
sample_pages = 200

[vm.idle1]
min = "160M"
max = "768M"

[vm.idle2]
min = "160M"
max = "768M"

[vm.active1]
min = "160M"
max = "512M"
TOML
"$hv" run --config "$work/hv.toml" &
hvpid=$!
echo "--- hv run started (pid $hvpid); host available: $(avail); sampling working sets for 25 s"
sleep 25
"$hv" status idle1 idle2 active1 || true
echo "--- real pressure: locking host memory until 3 % is available (soft is below 4 %)"
"$py" -m tests.functional.pressure --pct 3 --hold &
lockpid=$!
for ((t = 15; t <= duration; t += 15)); do
    sleep 15
    kill -0 "$hvpid" 2>/dev/null || { echo "demo: hv run exited early" >&2; exit 1; }
    echo "--- after ${t} s of pressure: host available $(avail)"
    "$hv" status idle1 idle2 active1 || true
done
log=${HV_STATE_DIR:-/var/lib/hv}/daemon/events.jsonl
echo "--- what hv did under pressure (from $log)"
"$py" - "$log" <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
start = max(i for i, e in enumerate(events) if e["event"] == "start")
run = events[start:]
total = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
first_state = None
for e in run:
    if e["event"] == "state":
        print(f"state {e['previous']} -> {e['state']} (free {e['free_bytes'] / 2**20:.0f} MiB, "
              f"{100 * e['free_bytes'] / total:.1f} %)")
        if e["state"] != "high" and first_state is None:
            first_state = e
if first_state is not None:
    t0, low_free = first_state["ts"], first_state["free_bytes"]
    after = [e for e in run if e["event"] == "tick" and e["ts"] >= t0]
    back = next((e for e in after if e["free_bytes"] > 0.045 * total), None)
    high = next((e for e in run if e["event"] == "state" and e["ts"] > t0 and e["state"] == "high"), None)
    print(f"reclamation: free {low_free / 2**20:.0f} MiB when hv left high; "
          + (f"above soft + hysteresis (4.5 %) after {back['ts'] - t0:.0f} s "
             f"({back['free_bytes'] / 2**20:.0f} MiB)" if back else "never above soft + hysteresis")
          + (f"; back to high after {high['ts'] - t0:.0f} s" if high else "; still reclaiming"))
for kind in ("balloon", "swap", "pause"):
    by = {}
    for e in run:
        if e["event"] == kind:
            by[e["vm"]] = by.get(e["vm"], 0) + 1
    print(f"{kind} actions: {by or 'none'}")
last = {}
for e in run:
    if e["event"] == "tick":
        last[e["vm"]] = e
for vm, e in sorted(last.items()):
    print(f"{vm}: target {e['target_bytes'] / 2**20:.0f} MiB, balloon {e['balloon_bytes'] / 2**20:.0f} MiB, "
          f"resident {e['resident_bytes'] / 2**20:.0f} MiB, active {e['active']['fraction']:.2f}")
PY
kill "$lockpid"; wait "$lockpid" 2>/dev/null || true; lockpid=""
echo "--- pressure released; host available $(avail)"
kill -INT "$hvpid"; wait "$hvpid"; hvpid=""
echo "--- page sharing"
"$hv" share idle1 idle2 active1
