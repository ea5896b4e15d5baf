#!/usr/bin/env bash
# Run hv's tests (real guests, real QMP, real KSM and swap) with the project's virtualenv.
# Extra arguments go to pytest. Exit status 5 ("no tests collected") counts as failure.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
"$repo/.venv/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
    echo "test: error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
