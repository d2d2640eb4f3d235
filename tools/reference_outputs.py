#!/usr/bin/python3
"""Computes PyTorch reference outputs of a character-input model.

    /usr/bin/python3 tools/reference_outputs.py MODEL_VERSION_DIR \\
        [--count 100] [--seed 12345] [--generator auto|brackets|tagger] \\
        --out FILE.json

Loads the model version with rnnserve_export.load(), generates ``count``
strings from ``seed`` (which differs from the training and held-out seeds)
with the data generator of the model's training script --
train_brackets.py for "brackets", train_tagger.py for "tagger"; "auto"
(the default) picks the tagger's for a net that ends in a sequence, the
brackets' otherwise -- encodes them with the net's own alphabet, runs the net
in float32 and writes

    {"model": "<model name>", "version": N, "labels": [...], "seed": S,
     "output": "vector" or "sequence",
     "cases": [{"text": "...", "probabilities": [p0, p1, ...]}, ...]}

for a net that ends after SequenceLast (one distribution per string), or,
for a net that ends in a sequence (one distribution per character),

     "cases": [{"text": "...", "probabilities": [[p0, p1, ...], ...]}, ...]

with one inner list per element of the output sequence. Each probability is
the exact float32 result, written as Python's repr of it (reads back to the
same float32 value). The integration tests compare the daemon's answers with
these.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

GENERATORS = ("brackets", "tagger")


def _generator(name):
    if name == "brackets":
        import train_brackets
        return train_brackets.held_out_strings
    if name == "tagger":
        import train_tagger
        return train_tagger.held_out_strings
    raise SystemExit("unknown generator %r; use one of %s"
                     % (name, ", ".join(GENERATORS)))


def reference_cases(version_dir, count, seed, generator="auto"):
    import torch
    import rnnserve_export as rx

    net = rx.load(version_dir)
    if not net.alphabet:
        raise SystemExit("%s: the net has no characters encoder" % version_dir)
    if generator == "auto":
        generator = "tagger" if net.ends_with_sequence else "brackets"
    texts = _generator(generator)(count, seed)
    cases = []
    if not texts:
        return net, cases
    seqs = [rx.encode_text(t, net.alphabet, ignore_case=net.ignore_case,
                           unknown_token=net.unknown_token) for t in texts]
    x, lengths = rx.pad_batch(seqs, tokens=True)
    with torch.no_grad():
        probs, out_lengths = net.forward_with_lengths(x, lengths)
    probs = probs.to(torch.float32).numpy()
    for i, text in enumerate(texts):
        if net.ends_with_sequence:
            rows = probs[i, :int(out_lengths[i])]
            value = [[float(p) for p in row] for row in rows]
        else:
            value = [float(p) for p in probs[i]]
        cases.append({"text": text, "probabilities": value})
    return net, cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version_dir", metavar="MODEL_VERSION_DIR")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--generator", default="auto",
                        choices=("auto",) + GENERATORS,
                        help="which training script's strings to use")
    parser.add_argument("--out", required=True, metavar="FILE.json")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    version_dir = os.path.abspath(args.version_dir)
    net, cases = reference_cases(version_dir, args.count, args.seed, args.generator)
    model = os.path.basename(os.path.dirname(version_dir.rstrip(os.sep)))
    version = os.path.basename(version_dir.rstrip(os.sep))
    result = {
        "model": model,
        "version": int(version) if version.isdigit() else version,
        "labels": net.labels or [],
        "seed": args.seed,
        "output": "sequence" if net.ends_with_sequence else "vector",
        "cases": cases,
    }
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote %d cases to %s" % (len(cases), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
