#!/usr/bin/env python3
"""Groups a perf profile's samples by what they serve.

Each sample counts once, for the first area (in the order below) that any
frame of its stack belongs to; samples that match none are listed by their
innermost frame. `--containing REGEX` instead prints the share of samples
with at least one frame matching REGEX.

    perf record -F 499 -g --call-graph dwarf,16384 -o perf.data <tidings-sim run ...>
    perf script -i perf.data -F comm,tid,ip,sym --no-inline > perf.txt
    python3 simulations/scripts/perf_by_area.py perf.txt [--containing REGEX]
"""

import argparse
import collections
import re

# First match wins: the node's own work before the libp2p machinery under it.
AREAS = [
    ("MLS key packages", r"MlsEngine::key_package"),
    ("relay mailbox service", r"relay::MailboxService"),
    ("node core", r"tidings_node::core::Core"),
    ("group sync", r"NodeHandle::group_sync"),
    ("mailbox sync", r"NodeHandle::mailbox_sync"),
    ("node handle, other", r"tidings_node::node::"),
    ("simulator world", r"tidings_sim::"),
    ("kad behaviour", r"libp2p_kad::behaviour"),
    ("network event loop", r"tidings_node::net::EventLoop"),
    ("identify", r"libp2p_identify::"),
    ("relay handlers (client and server)", r"libp2p_relay::"),
    ("ping", r"libp2p_ping::"),
    ("autonat", r"autonat"),
    ("kad handler", r"libp2p_kad::handler"),
    ("request-response", r"request_response"),
    ("yamux", r"yamux"),
    ("connection task, other", r"libp2p_swarm::connection"),
    ("swarm, other", r"libp2p_swarm::"),
    ("simulated transport", r"tidings_node::sim::"),
    ("tokio timers", r"tokio::runtime::time|tokio::time"),
    ("tokio, other", r"tokio::"),
    ("allocator", r"rjem|malloc"),
]


def samples(path):
    """Yields each sample's frames, innermost first."""
    frames = []
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                if frames:
                    yield frames
                frames = []
            elif line[0] in " \t":
                parts = line.split(None, 1)
                if len(parts) == 2:
                    frames.append(re.sub(r"\+0x[0-9a-f]+$", "", parts[1].strip()))
    if frames:
        yield frames


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("script", help="output of `perf script -F comm,tid,ip,sym --no-inline`")
    ap.add_argument("--containing", help="share of samples with a frame matching this regex")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    areas = [(name, re.compile(p)) for name, p in AREAS]
    wanted = re.compile(args.containing) if args.containing else None
    counts = collections.Counter()
    total = hits = 0
    for frames in samples(args.script):
        total += 1
        if wanted:
            hits += any(wanted.search(f) for f in frames)
            continue
        stack = "\n".join(frames)
        name = next((n for n, p in areas if p.search(stack)), "other: " + frames[0][:60])
        counts[name] += 1
    if not total:
        raise SystemExit("no samples")
    if wanted:
        print(f"{100 * hits / total:6.2f}% of {total} samples contain {args.containing}")
        return
    for name, n in counts.most_common(args.top):
        print(f"{100 * n / total:6.2f}% {name}")


if __name__ == "__main__":
    main()
