#!/usr/bin/env bash
# Launch N test guests ready for hv, or stop them.
#   scripts/run_guests.sh [-n N] [-m 256M] [-w idle|toucher|hog|filecache] [-p PREFIX]
#                         [--param KEY=VALUE]... [--deflate-on-oom] [--free-page-reporting]
#   scripts/run_guests.sh --stop        stop every guest hv launched (graceful, then hard)
# Each guest: a named RAM backend with merge=on, virtio-balloon with statistics, a QMP
# socket (0600), console log and pid file in $HV_RUN_DIR/NAME (default /run/hv/NAME).
# The accelerator is picked by measurement (`hv accel` says why).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
hv=${HV_BIN:-$repo/.venv/bin/hv}
[ -x "$hv" ] || { echo "run_guests: error: $hv missing: run scripts/setup.sh first" >&2; exit 1; }
case "${1:-}" in
    --stop|stop) exec "$hv" stop --all ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
exec "$hv" launch "$@"
