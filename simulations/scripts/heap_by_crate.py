#!/usr/bin/env python3
"""Sums a heaptrack profile's peak memory by crate.

Each stack's peak bytes are charged to its innermost frame that belongs to a
crate other than the standard library and general-purpose containers, so
that a `Vec` grown inside libp2p-noise counts for libp2p-noise.

    heaptrack_print -f PROFILE.zst --print-flamegraph fg.txt --flamegraph-cost-type peak
    python3 simulations/scripts/heap_by_crate.py fg.txt [--top N] [--sites N]

`--sites N` also lists the N functions that hold the most (the frame each
stack was charged to).
"""

import argparse
import collections
import re

# Crates whose allocations belong to whoever called them.
GENERIC = {
    "alloc", "core", "std", "hashbrown", "smallvec", "bytes", "arrayvec",
    "indexmap", "futures_util", "futures_core", "tracing", "__rustc",
}
V0_CRATE = re.compile(r"C(?:s[0-9A-Za-z]*_)?(\d+)")
HASH = re.compile(r"::h[0-9a-f]{16}$")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def crate_of(frame):
    """The crate of a frame's function: for `<Type as Trait>::f`, the type's crate."""
    name = frame.split(" (", 1)[0].strip()
    if name.startswith("_R"):
        # v0 mangling: the first crate root is `C[s<hash>_]<length><name>`.
        m = V0_CRATE.search(name)
        if not m:
            return None
        start = m.end()
        return name[start : start + int(m.group(1))]
    for prefix in ("_$LT$", "<"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    m = IDENT.match(name)
    if not m or not name[m.end() :].startswith(("::", "..")):
        return None
    return m.group(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("flamegraph")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--sites", type=int, default=0)
    args = ap.parse_args()
    by_crate = collections.Counter()
    by_site = collections.Counter()
    total = 0
    with open(args.flamegraph, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, cost = line.rstrip("\n").rpartition(" ")
            if not cost.isdigit():
                continue
            n = int(cost)
            total += n
            owner, site = "(unattributed)", "(unattributed)"
            for frame in reversed(stack.rstrip(";").split(";")):
                c = crate_of(frame)
                if c and c not in GENERIC:
                    owner, site = c, HASH.sub("", frame.split(" (", 1)[0].strip())
                    break
            by_crate[owner] += n
            by_site[site] += n
    print(f"{total / 2**20:10.1f} MiB  total at the peak")
    for crate, n in by_crate.most_common(args.top):
        print(f"{n / 2**20:10.1f} MiB  {crate}")
    if args.sites:
        print()
        for site, n in by_site.most_common(args.sites):
            print(f"{n / 2**20:10.1f} MiB  {site[:160]}")


if __name__ == "__main__":
    main()
