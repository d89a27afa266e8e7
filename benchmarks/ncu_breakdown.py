"""Where the Hopper attention kernel's consumer warps spend their time, from an Nsight Compute source page.

Reads the per-SASS-instruction CSV that `gpu_session.sh ncu` writes (`ncu -i REPORT --page source
--print-source sass --csv`) and prints, for the consumer warpgroups' code (between their setmaxnreg
increase and the producer's decrease), the warp-stall samples by reason, the executed instructions by
opcode, and the samples of each stretch of the main loop, split at the HGMMA and warpgroup-wait
instructions, so that "waiting for S", "row max", "exp2 and sums" and "issuing MMAs" show as numbers.

Usage: python benchmarks/ncu_breakdown.py attention_map_1_sass.csv [--top 12]
"""

import argparse
import collections
import csv
import re

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def opcode(source: str) -> str:
    match = re.match(r"\s*(@!?U?P\w+\s+)?([A-Z0-9_]+)", source)
    return match.group(2) if match else "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    rows = list(csv.reader(open(args.csv)))
    header = rows[1]
    column = {name: i for i, name in enumerate(header)}
    body = [r for r in rows[2:] if len(r) >= len(header)]
    number = lambda r, name: int(r[column[name]] or 0)  # noqa: E731
    source = lambda r: r[column["Source"]]  # noqa: E731
    first = next(i for i, r in enumerate(body) if "USETMAXREG.TRY_ALLOC" in source(r))
    last = next(i for i, r in enumerate(body) if "USETMAXREG.DEALLOC" in source(r))
    consumer = body[first:last]
    total = sum(number(r, SAMPLES) for r in body)
    samples = sum(number(r, SAMPLES) for r in consumer)
    print(f"consumer warps: {samples} of {total} stall samples ({100 * samples / total:.1f}%)")

    reasons = collections.Counter()
    for r in consumer:
        for name in header:
            if name.startswith("stall_") and "Not Issued" not in name:
                reasons[name] += number(r, name)
    print("by reason: " +
          ", ".join(f"{name[6:]} {100 * n / samples:.1f}%" for name, n in reasons.most_common(args.top)))

    executed = collections.Counter()
    for r in consumer:
        executed[opcode(source(r))] += number(r, EXECUTED)
    hgmma = executed["HGMMA"]
    per_tile = 16 / hgmma if hgmma else 0  # the d128 main loop issues 16 HGMMA per tile
    print("per tile and warp (16 HGMMA a tile): " +
          ", ".join(f"{op} {n * per_tile:.0f}" for op, n in executed.most_common(args.top)))

    # Stretches of the main loop (the instructions executed as often as its HGMMAs), in address order,
    # cut where a phase starts: an mbarrier wait, an HGMMA batch, a warpgroup wait, or a change between
    # runs of FMNMX (row max), MUFU.EX2 (exp2 and sums) and F2FP (packing P). Partial and masked tiles
    # have their own copy of the softmax, so a phase can show twice; stretches under 0.5% are left out.
    loop_count = collections.Counter(number(r, EXECUTED) for r in consumer if opcode(source(r)) == "HGMMA")
    hot = loop_count.most_common(1)[0][0] if loop_count else 0
    names = {"FMNMX": "row max", "MUFU": "exp2 + row sums", "F2FP": "pack P (and rescale O)"}
    stretches, label, current, previous, phase = [], "loop head (barrier waits)", 0, "", ""
    for r in consumer:
        if number(r, EXECUTED) < 0.9 * hot:
            continue
        op, text = opcode(source(r)), source(r).strip()
        cut = None
        if op == "HGMMA" and previous != "HGMMA":
            cut = "issue " + ("P V" if "tnspB" in text else "S = Q K^T") + " MMAs"
        elif "DEPBAR" in text:
            cut = "wait: " + text[:40]
        elif "SYNCS.PHASECHK" in text and previous != "SYNCS":
            cut = "wait for K / V (mbarrier) and build descriptors"
        elif op in names and op != phase:
            cut = names[op]
        if cut:
            stretches.append((label, current))
            label, current, phase = cut, 0, op if op in names else ""
        current += number(r, SAMPLES)
        if op == "HGMMA" or not op.startswith("U"):
            previous = op
    stretches.append((label, current))
    print("main loop, share of the consumer samples per stretch (in code order):")
    for label, n in stretches:
        if n >= 0.005 * samples:
            print(f"  {100 * n / samples:5.1f}%  {label}")


if __name__ == "__main__":
    main()
