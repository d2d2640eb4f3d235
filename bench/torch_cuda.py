"""PyTorch's CUDA nn.LSTM and nn.GRU on cuda_bench's shapes, for users who
compare with what they trained on. fp32 with TF32 off, as the engine runs.

Prints one line per cell and batch: the median ms of one forward pass over
a [T, batch, H] sequence, timed with CUDA events.
"""
import argparse
import statistics

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    h, t = args.hidden, args.steps
    print(f"PyTorch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
          f"H={h}, T={t}, fp32, ms per batch (medians of {args.reps})")
    for name, cls in (("LSTM", torch.nn.LSTM), ("GRU", torch.nn.GRU)):
        net = cls(h, h).cuda().eval()
        for batch in (1, 8, 64):
            x = torch.randn(t, batch, h, device="cuda")
            times = []
            with torch.inference_mode():
                for r in range(args.reps + 3):
                    start = torch.cuda.Event(enable_timing=True)
                    stop = torch.cuda.Event(enable_timing=True)
                    start.record()
                    net(x)
                    stop.record()
                    stop.synchronize()
                    if r >= 3:
                        times.append(start.elapsed_time(stop))
            print(f"{name:5s} {batch:5d} {statistics.median(times):9.3f} ms")


if __name__ == "__main__":
    main()
