#!/usr/bin/env python3
"""Several Velocity configurations side by side in ONE lbbench run (A/B, A/A).

lbbench (../shared/bench/lbbench.py) takes one custom proxy. This runs its own main() with
that one slot widened to several: every `--variant NAME=TEMPLATE` is a custom proxy of its
own (own port, own process, own CPU count), started from a config rendered from TEMPLATE
(string.Template: $port, $backends = the harness's backends as `      - address: HOST:PORT`
lines). The rounds interleave the variants exactly as they interleave nginx and haproxy, so
their per-round ratios are paired the same way. lbbench itself is not changed.

After lbbench's own table, prints each variant against the first one: the medians of the
per-round paired ratios (min-max) of CPU per request, speed-normalised CPU per request,
req/s and p99.

Usage: lbbench_ab.py --bin VELOCITY --variant plain=plain.yaml --variant policy=policy.yaml
                     [lbbench flags, e.g. -r 8 -d 4 --rate 10000 -c 64 --json out.json]
LBBENCH=dir of lbbench.py (default ../shared/bench beside the checkout).
"""

import argparse
import json
import os
import statistics
import string
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("LBBENCH", os.path.join(ROOT, "..", "shared", "bench")))
import lbbench  # noqa: E402  (the path above first)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="the velocity binary")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=TEMPLATE",
                    help="a Velocity config to run as its own proxy; the first is the baseline")
    ours, rest = ap.parse_known_args()
    variants = {}
    for v in ours.variant:
        name, _, path = v.partition("=")
        if not name or not path:
            ap.error(f"--variant {v!r}: NAME=TEMPLATE")
        with open(path) as f:
            variants[name] = string.Template(f.read())
    return ours.bin, variants, rest


def main():
    binary, variants, rest = parse()
    names = list(variants)
    port_of = {}

    def proxy_kind(name, custom_name="custom"):
        return "custom" if name in variants else original_kind(name, custom_name)

    def proxy_port(a, name):
        if name in variants:
            return a.custom_port + 10 * names.index(name)
        return original_port(a, name)

    def start_proxy(a, reg, tmpdir, name, backends):
        if name in variants:
            port = proxy_port(a, name)
            lines = "\n".join(f"      - address: {lbbench.LOOPBACK}:{p}" for _, p, _ in backends)
            config = os.path.join(tmpdir, f"{name}.yaml")
            with open(config, "w") as f:
                f.write(variants[name].substitute(port=port, backends=lines))
            # exec: the harness counts CPU over the command's process tree, so no shell stays.
            a.custom_cmd = f"exec {binary} run -c {config}"
            port_of[name] = port
        return original_start(a, reg, tmpdir, name, backends)

    original_kind, original_port, original_start = lbbench.proxy_kind, lbbench.proxy_port, lbbench.start_proxy
    lbbench.proxy_kind, lbbench.proxy_port, lbbench.start_proxy = proxy_kind, proxy_port, start_proxy

    args = list(rest)
    if "--proxies" not in args:
        args += ["--proxies", ",".join(names)]
    if "--json" in args:  # the last one, as argparse takes it
        out = args[len(args) - 1 - args[::-1].index("--json") + 1]
    else:
        out = os.path.join(tempfile.mkdtemp(prefix="lbbench-ab-"), "ab.json")
        args += ["--json", out]
    # lbbench's own checks want the custom slot named and given a command; start_proxy above
    # replaces the command per variant.
    args += ["--custom-name", names[0], "--custom-cmd", "true"]
    rc = lbbench.main(args)
    if os.path.exists(out):
        print(paired(out, names))
    return rc


def paired(path, names):
    with open(path) as f:
        runs = json.load(f)["runs"]
    by = {}
    for r in runs:
        if r.get("ok"):
            by.setdefault(r["proxy"], {})[r["round"]] = r
    base = names[0]
    fields = [("CPU µs/req", "proxy_cpu_us_per_req"), ("normalised CPU/req", "proxy_cpu_us_per_req_norm"),
              ("req/s", "rps"), ("p99", "p99_ms")]
    lines = [f"\nPaired per-round ratios against `{base}` (median, min-max over rounds):\n",
             "| variant | " + " | ".join(h for h, _ in fields) + " | medians: CPU µs/req, p99 ms | errors |",
             "|---" * (len(fields) + 3) + "|"]
    for n in names:
        cells = []
        for _, key in fields:
            ratios = [r[key] / by[base][rnd][key] for rnd, r in sorted(by.get(n, {}).items())
                      if r.get(key) and by.get(base, {}).get(rnd, {}).get(key)]
            cells.append(f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "n/a")
        rs = list(by.get(n, {}).values())
        med = lambda k: statistics.median([r[k] for r in rs if r.get(k) is not None]) if rs else float("nan")  # noqa: E731
        errors = sum(r.get("errors_total", 0) for r in runs if r["proxy"] == n)
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {med('proxy_cpu_us_per_req'):.2f}, {med('p99_ms'):.3f} | {errors} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
