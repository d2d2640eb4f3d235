#!/usr/bin/python3
"""Writes PyTorch parity fixtures for the engine tests.

    /usr/bin/python3 tests/parity/make_fixtures.py OUT_DIR

For every case, OUT_DIR/<case>/ holds

  net.pbtxt, weights.safetensors   the net, as tools/rnnserve_export.py writes it
                                   (random fp32 weights, nonzero biases)
  io.safetensors                   a batch and PyTorch's answer for it:
    "lengths"   I64 [B]            sequence lengths, mixed and unsorted, with
                                   1 and the maximum among them
    "tokens"    I64 [sum(lengths)] token ids of all instances, concatenated in
                                   batch order (nets with a TOKEN_SEQUENCE input)
    "vectors"   F32 [sum(lengths), width]   likewise, for VECTOR_SEQUENCE inputs
    "expected"  F32 [sum(lengths), D]  per-position outputs, concatenated in
                                   batch order, for nets that end in a sequence;
                F32 [B, D]         for nets that end after SequenceLastLayer
    metadata "output": "sequence" or "vector", telling the two apart.

and OUT_DIR/manifest.txt lists the case names, one a line. Recurrent layers
run through torch.nn.RNN/GRU/LSTM on packed sequences. The output is the same
bytes on every run.
"""

import os
import sys
import zlib

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))

import rnnserve_export as rx  # noqa: E402

VOCAB = 11
IN = 5      # input width, different from every hidden size
HIDDEN = 7


def _vectors_net(modules, width=IN):
    return rx.SequenceNet(modules, input_width=width)


def _cases():
    """(name, builder, input kind) for every case. Builders run after
    torch.manual_seed, so weights are reproducible."""
    cases = [
        ("embedding_linear", lambda: rx.SequenceNet(
            [nn.Embedding(VOCAB, IN), nn.Linear(IN, HIDDEN)]), "tokens"),
        ("linear_relu_linear", lambda: _vectors_net(
            [nn.Linear(IN, 9), nn.ReLU(), nn.Linear(9, 3)]), "vectors"),
    ]
    functions = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU,
                 "elu": nn.ELU, "softplus": nn.Softplus, "gelu": nn.GELU}
    for function, module in functions.items():
        cases.append(("elementwise_" + function,
                      (lambda m=module: _vectors_net([m()])), "wide_vectors"))
    cases += [
        ("softmax", lambda: _vectors_net([nn.Softmax(dim=-1)]), "wide_vectors"),
        ("linear_softmax", lambda: _vectors_net(
            [nn.Linear(IN, 4), nn.Softmax(dim=-1)]), "vectors"),
        ("rnn_tanh", lambda: _vectors_net(
            [nn.RNN(IN, HIDDEN, nonlinearity="tanh", batch_first=True)]), "vectors"),
        ("rnn_relu", lambda: _vectors_net(
            [nn.RNN(IN, HIDDEN, nonlinearity="relu", batch_first=True)]), "vectors"),
        ("gru", lambda: _vectors_net([nn.GRU(IN, HIDDEN, batch_first=True)]), "vectors"),
        ("lstm", lambda: _vectors_net([nn.LSTM(IN, HIDDEN, batch_first=True)]), "vectors"),
        ("rnn_last", lambda: _vectors_net(
            [nn.RNN(IN, HIDDEN, batch_first=True), rx.SequenceLast()]), "vectors"),
        ("gru_last", lambda: _vectors_net(
            [nn.GRU(IN, HIDDEN, batch_first=True), rx.SequenceLast()]), "vectors"),
        ("lstm_last", lambda: _vectors_net(
            [nn.LSTM(IN, HIDDEN, batch_first=True), rx.SequenceLast()]), "vectors"),
        ("tagger", lambda: rx.SequenceNet(
            [nn.Embedding(VOCAB, 6), nn.LSTM(6, 8, batch_first=True),
             nn.Linear(8, 4), nn.Softmax(dim=-1)]), "tokens"),
        ("chain", lambda: rx.SequenceNet(
            [nn.Embedding(13, 6), nn.GRU(6, 9, batch_first=True),
             nn.LSTM(9, HIDDEN, batch_first=True), rx.SequenceLast(),
             nn.Linear(HIDDEN, 4), nn.Softmax(dim=-1)]), "tokens"),
    ]
    return cases


def _lengths(rng):
    """6 to 9 lengths in random order, including 1 and the maximum (twice)."""
    batch = int(rng.randint(6, 10))
    longest = int(rng.randint(13, 21))
    lengths = [1, longest, longest] + [int(v) for v in rng.randint(1, longest + 1, batch - 3)]
    rng.shuffle(lengths)
    return lengths


def _inputs(rng, kind, lengths, vocab, width):
    if kind == "tokens":
        return [rng.randint(0, vocab, n).astype(np.int64) for n in lengths]
    seqs = []
    for n in lengths:
        x = rng.standard_normal((n, width)).astype(np.float32)
        if kind == "wide_vectors":
            # Spread the values out and add some far from zero, where
            # saturation and overflow show.
            x *= 3.0
            mask = rng.random_sample((n, width)) < 0.1
            x[mask] = rng.choice([-90.0, -25.0, 25.0, 90.0], int(mask.sum()))
        seqs.append(x)
    return seqs


def make_case(out_dir, name, build, kind):
    # Seeded by name, so adding a case leaves the others unchanged.
    seed = zlib.crc32(name.encode("ascii"))
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    net = build().eval()
    case_dir = os.path.join(out_dir, name)
    rx.write_net(net, case_dir, name)

    lengths = _lengths(rng)
    input_kind, size = net.input_spec()
    seqs = _inputs(rng, kind, lengths, size, size)
    x, lengths_t = rx.pad_batch(seqs, tokens=(input_kind == "tokens"))
    with torch.no_grad():
        out = net(x, lengths_t).numpy().astype(np.float32)
    if net.ends_with_sequence:
        expected = np.concatenate([out[i, :n] for i, n in enumerate(lengths)])
    else:
        expected = out
    if not np.all(np.isfinite(expected)):
        raise SystemExit("case %s: non-finite expected values" % name)

    # The exported files must give the very same answers.
    with torch.no_grad():
        again = rx.load(case_dir)(x, lengths_t).numpy()
    if not np.array_equal(again, out):
        raise SystemExit("case %s: the exported net differs from the original" % name)

    io = {"lengths": np.asarray(lengths, dtype=np.int64)}
    key = "tokens" if input_kind == "tokens" else "vectors"
    io[key] = np.concatenate(seqs)
    io["expected"] = np.ascontiguousarray(expected, dtype=np.float32)
    rx.write_safetensors(
        os.path.join(case_dir, "io.safetensors"), io,
        metadata={"output": "sequence" if net.ends_with_sequence else "vector"})


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: %s OUT_DIR\n" % argv[0])
        return 2
    out_dir = argv[1]
    torch.set_num_threads(1)
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for name, build, kind in _cases():
        make_case(out_dir, name, build, kind)
        names.append(name)
    with open(os.path.join(out_dir, "manifest.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    print("wrote %d parity cases to %s" % (len(names), out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
