#!/usr/bin/env python3
"""Balloon benchmark: now ``hv bench balloon`` (the paper's Figure 2; hv/bench/balloon.py).

It boots guests at each size X, and larger guests ballooned (and hypervisor-swapped)
down to X, and measures a workload's throughput in each; the time the balloon took to
reach X and the guest's host memory before and after are in its JSON.  This script
passes its arguments on:

    .venv/bin/python scripts/bench_balloon.py [--sizes 192,256,...] [-m 512M] [--out DIR]
"""

from __future__ import annotations

import sys

from hv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "balloon", *sys.argv[1:]]))
