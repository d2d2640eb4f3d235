#!/usr/bin/python3
"""Times PyTorch's nn.LSTM and nn.GRU for rnn_bench; prints JSON on stdout.

Every shape is run two ways under torch.inference_mode():

  padded  a plain [T, B, I] tensor through the module (time-major, the
          module's native layout; no lengths).
  packed  the same tensor packed with pack_padded_sequence (all lengths
          equal to T), run, and unpacked with pad_packed_sequence; the timed
          region covers all three, as the engine's Net::Run also packs its
          input and unpacks its output.

Each timing is the median (and min and max) of --reps runs after --warmup
untimed runs, in
milliseconds per whole sequence batch. Nothing but the JSON document goes to
stdout; progress and errors go to stderr.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--input", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batches", default="1,16,64",
                   help="comma-separated batch sizes")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--verbose", action="store_true",
                   help="print each timing on stderr as it is taken")
    return p.parse_args()


def time_calls(fn, reps, warmup):
    """Median, min and max milliseconds per call over `reps` timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), max(times)


def blas_info(torch):
    """The BLAS torch was built against, as its build settings name it."""
    match = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return match.group(1) if match else "unknown"


def main():
    args = parse_args()
    try:
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence
        from torch.nn.utils.rnn import pad_packed_sequence
    except ImportError as e:
        json.dump({"available": False, "reason": "cannot import torch: %s" % e},
                  sys.stdout)
        print()
        return 0

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    batches = [int(b) for b in args.batches.split(",") if b]
    modules = {
        "lstm": torch.nn.LSTM(args.input, args.hidden),
        "gru": torch.nn.GRU(args.input, args.hidden),
    }

    results = []
    with torch.inference_mode():
        for cell, module in modules.items():
            module.eval()
            for batch in batches:
                x = torch.rand(args.steps, batch, args.input) * 2 - 1
                lengths = torch.full((batch,), args.steps, dtype=torch.int64)

                def run_padded():
                    module(x)

                def run_packed():
                    packed = pack_padded_sequence(x, lengths)
                    out, _ = module(packed)
                    pad_packed_sequence(out)

                for mode, fn in (("padded", run_padded),
                                 ("packed", run_packed)):
                    ms, lo, hi = time_calls(fn, args.reps, args.warmup)
                    if args.verbose:
                        print("torch %s batch %d %s: %.3f ms" %
                              (cell, batch, mode, ms), file=sys.stderr)
                    results.append({"cell": cell, "batch": batch,
                                    "mode": mode, "median_ms": ms,
                                    "min_ms": lo, "max_ms": hi,
                                    "reps": args.reps})

    json.dump({
        "available": True,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", ""),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "blas": blas_info(torch),
        "results": results,
    }, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
