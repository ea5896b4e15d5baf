#!/usr/bin/python3
"""Loads for the services variant of hv's Debian guest (run by hv-service).

    load.py http --report-s 10 --clients 2 --say /dev/ttyS0
        GETs random files under http://127.0.0.1/hv/ (the files build_services.sh put
        in /var/www/html/hv, listed in index.txt) over keep-alive connections.
    load.py python --report-s 10 --mib 96 --say /dev/ttyS0
        A language-runtime workload: an in-process LRU cache of rendered JSON documents
        of about MIB MiB, hit by lookups (rendering on a miss), with sorting and regex
        work per request.

Each prints ``hv-guest: event=service_load service=S t_s=T ops=N`` (cumulative) every
report period.
"""

import argparse
import collections
import http.client
import json
import random
import re
import threading
import time


def reporter(name, say, period, counter):
    start = time.monotonic()
    while True:
        time.sleep(period)
        with open(say, "w") as out:
            out.write(f"hv-guest: event=service_load service={name} "
                      f"t_s={time.monotonic() - start:.0f} ops={counter[0]}\n")


def http_client(files, counter, lock):
    conn = http.client.HTTPConnection("127.0.0.1", 80, timeout=30)
    rng = random.Random()
    while True:
        path = rng.choice(files)
        try:
            conn.request("GET", "/hv/" + path)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise OSError(f"status {resp.status}")
        except (OSError, http.client.HTTPException):
            conn.close()
            time.sleep(1)
            conn = http.client.HTTPConnection("127.0.0.1", 80, timeout=30)
            continue
        with lock:
            counter[0] += 1


def run_http(args, counter):
    with open("/var/www/html/hv/index.txt") as f:
        files = f.read().split()
    lock = threading.Lock()
    for _ in range(args.clients):
        threading.Thread(target=http_client, args=(files, counter, lock), daemon=True).start()
    reporter("nginx", args.say, args.report_s, counter)


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()


def render(key, rng):
    doc = {"id": key, "name": " ".join(rng.choice(WORDS) for _ in range(6)),
           "tags": sorted(rng.sample(WORDS, 5)),
           "scores": [rng.random() for _ in range(40)],
           "items": [{"sku": f"{key}-{i}", "qty": rng.randrange(100),
                      "note": " ".join(rng.choice(WORDS) for _ in range(8))} for i in range(12)]}
    return json.dumps(doc)


def run_python(args, counter):
    threading.Thread(target=reporter, args=("python", args.say, args.report_s, counter),
                     daemon=True).start()
    cache = collections.OrderedDict()
    rng = random.Random()
    pattern = re.compile(r"\b(alpha|omega)\b")
    budget = args.mib * 1024 * 1024
    size = 0
    keys = 1 << 20
    while True:
        key = int(rng.paretovariate(1.2) * 1000) % keys
        doc = cache.get(key)
        if doc is None:
            doc = render(key, rng)
            cache[key] = doc
            size += len(doc) + 200  # the str and the dict entry, roughly
            while size > budget:
                _, old = cache.popitem(last=False)
                size -= len(old) + 200
        else:
            cache.move_to_end(key)
        sorted(json.loads(doc)["scores"])
        len(pattern.findall(doc))
        counter[0] += 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("http", "python"))
    p.add_argument("--report-s", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--mib", type=int, default=96)
    p.add_argument("--say", default="/dev/ttyS0")
    args = p.parse_args()
    counter = [0]
    (run_http if args.mode == "http" else run_python)(args, counter)


if __name__ == "__main__":
    main()
