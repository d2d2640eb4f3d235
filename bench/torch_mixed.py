"""PyTorch side of mixed_length_bench: a packed bidirectional nn.LSTM.

Prints one line, "packed_ms <median milliseconds>", for a batch of the given
lengths (packing included, as a user of nn.LSTM pays for it).
"""
import argparse
import statistics
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--input", type=int, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--lengths", required=True)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lengths = torch.tensor([int(x) for x in args.lengths.split(",")])
    lstm = torch.nn.LSTM(args.input, args.hidden, num_layers=args.layers,
                         bidirectional=True, batch_first=True).eval()
    x = torch.randn(len(lengths), int(lengths.max()), args.input)

    def run():
        packed = pack_padded_sequence(x, lengths, batch_first=True,
                                      enforce_sorted=False)
        lstm(packed)

    with torch.inference_mode():
        run()
        run()
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
    print(f"packed_ms {statistics.median(times):.3f}")


if __name__ == "__main__":
    main()
