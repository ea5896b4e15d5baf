#!/usr/bin/env bash
# The soak (issue 10): `hv run` managing 8 guests with mixed workloads for N minutes under
# changing real host memory pressure, guests killed and relaunched, SIGHUP reloads.
# Writes a markdown and a JSON report; stops every guest and the memory locker and
# removes the swap it created.  Boots guests: run it under the shared lock, e.g.
#   flock /tmp/hv-tests.lock scripts/soak.sh --minutes 30 --report docs/soak-30min
# Options: --minutes N (required), --seed S, --report PREFIX, --keep.  See tests/soak/driver.py.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
exec "$repo/.venv/bin/python" -m tests.soak.driver "$@"
