#!/usr/bin/python3
"""Writes PyTorch parity fixtures for the engine tests.

    /usr/bin/python3 tests/parity/make_fixtures.py OUT_DIR

For every case, OUT_DIR/<case>/ holds

  net.pbtxt, weights.safetensors   the net (random fp32 weights, nonzero biases)
  io.safetensors                   a batch and PyTorch's answer for it, for
                                   the single-input cases of _cases():
    "lengths"   I64 [B]            sequence lengths, mixed and unsorted, with
                                   1 and the maximum among them
    "tokens"    I64 [sum(lengths)] token ids of all instances, concatenated in
                                   batch order (nets with a TOKEN_SEQUENCE input)
    "vectors"   F32 [sum(lengths), width]   likewise, for VECTOR_SEQUENCE inputs
    "expected"  F32 [sum(lengths), D]  per-position outputs, concatenated in
                                   batch order, for nets that end in a sequence;
                F32 [B, D]         for nets that end after SequenceLastLayer
    metadata "output": "sequence" or "vector", telling the two apart.

The other cases ("graph cases": stacked and bidirectional recurrent modules,
operators, sequence and attention layers, recurrent states, glue layers,
several inputs and outputs) use a general io.safetensors instead:

    "input.N.lengths"   I64 [B]            for each net input N: sequence
                                           lengths (all 1 for a VECTOR input)
    "input.N.tokens"    I64 [sum(lengths)] TOKEN_SEQUENCE inputs
    "input.N.vectors"   F32 [sum(lengths), width]  VECTOR_SEQUENCE inputs,
                        F32 [B, width]     VECTOR inputs
    "expected.O"        F32 [sum(lengths of O), width]  for each net output O
                                           that is a sequence, instances
                                           concatenated in batch order;
                        F32 [B, width]     for a vector output

in that order (inputs, then outputs, each in net order), without metadata.
Chain cases are exported with tools/rnnserve_export.py (SequenceNet), the
graph_* cases likewise (GraphNet); the others' net.pbtxt is written out here
(rnnserve_export.format_net). Their references are plain
PyTorch in float64, from the float32 weights written.

In the single-input cases recurrent layers run through torch.nn.RNN/GRU/LSTM
on packed sequences, and the net is exported with tools/rnnserve_export.py.

OUT_DIR/manifest.txt lists the case names, one a line. The output is the same
bytes on every run.
"""

import copy
import os
import sys
import zlib

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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
        # Sizes that fill whole 32-unit panels take the engine's fused
        # product-and-cell path; the small ones above take the general one.
        ("rnn_h64", lambda: _vectors_net(
            [nn.RNN(IN, 64, batch_first=True)]), "vectors"),
        ("gru_h64", lambda: _vectors_net(
            [nn.GRU(IN, 64, batch_first=True)]), "vectors"),
        ("lstm_h64", lambda: _vectors_net(
            [nn.LSTM(IN, 64, batch_first=True)]), "vectors"),
        # Batches of 12 or more project their inputs step by step inside the
        # engine; each instance alone does it up front, and the parity test
        # checks the two give the same bits.
        ("rnn_h64_b16", lambda: _vectors_net(
            [nn.RNN(IN, 64, batch_first=True)]), "vectors+batch"),
        ("gru_h64_b16", lambda: _vectors_net(
            [nn.GRU(IN, 64, batch_first=True)]), "vectors+batch"),
        ("lstm_h64_b16", lambda: _vectors_net(
            [nn.LSTM(IN, 64, batch_first=True)]), "vectors+batch"),
        ("tagger", lambda: rx.SequenceNet(
            [nn.Embedding(VOCAB, 6), nn.LSTM(6, 8, batch_first=True),
             nn.Linear(8, 4), nn.Softmax(dim=-1)]), "tokens"),
        ("chain", lambda: rx.SequenceNet(
            [nn.Embedding(13, 6), nn.GRU(6, 9, batch_first=True),
             nn.LSTM(9, HIDDEN, batch_first=True), rx.SequenceLast(),
             nn.Linear(HIDDEN, 4), nn.Softmax(dim=-1)]), "tokens"),
    ]
    return cases


def _lengths(rng, large=False):
    """6 to 9 lengths (12 to 16 when large) in random order, including 1 and
    the maximum (twice)."""
    batch = int(rng.randint(12, 17)) if large else int(rng.randint(6, 10))
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

    large = kind.endswith("+batch")
    kind = kind[:-len("+batch")] if large else kind
    lengths = _lengths(rng, large)
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


# --------------------------------------------------------------------------
# Graph cases: several inputs and outputs, operators, wiring
# --------------------------------------------------------------------------
#
# Written with the general io.safetensors of the module docstring. The
# references are plain PyTorch in float64 -- torch.nn modules on packed
# batches, or explicit loops over each sequence on its own -- from the very
# float32 weights written to weights.safetensors.

BATCH = 6


def _graph_lengths(rng, shortest=1):
    """BATCH lengths, unsorted, with `shortest` and the longest (twice)."""
    longest = int(rng.randint(9, 15))
    lengths = [shortest, longest, longest] + [
        int(v) for v in rng.randint(shortest, longest + 1, BATCH - 3)]
    while lengths == sorted(lengths) or lengths == sorted(lengths, reverse=True):
        rng.shuffle(lengths)
    rng.shuffle(lengths)
    return lengths


def _seqs(rng, lengths, width, scale=1.0):
    return [(scale * rng.standard_normal((n, width))).astype(np.float32)
            for n in lengths]


def _f64(a):
    if isinstance(a, torch.Tensor):
        return a.detach().to(torch.float64)
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _uniform(rng, shape, scale):
    return rng.uniform(-scale, scale, shape).astype(np.float32)


class _Arrays(dict):
    """weights.safetensors contents, with helpers that make random arrays."""

    def __init__(self, rng):
        super().__init__()
        self.rng = rng

    def linear(self, name, out, inp, bias=True):
        scale = 1.0 / np.sqrt(inp)
        self[name + ".weight"] = _uniform(self.rng, (out, inp), scale)
        self[name + ".bias"] = (_uniform(self.rng, (out,), scale) if bias
                                else np.zeros(out, np.float32))
        return _f64(self[name + ".weight"]), _f64(self[name + ".bias"])

    def recurrent(self, name, gates, hidden, inp):
        scale = 1.0 / np.sqrt(hidden)
        w = {}
        for array, shape in (("weight_ih", (gates * hidden, inp)),
                             ("weight_hh", (gates * hidden, hidden)),
                             ("bias_ih", (gates * hidden,)),
                             ("bias_hh", (gates * hidden,))):
            self[name + "." + array] = _uniform(self.rng, shape, scale)
            w[array] = _f64(self[name + "." + array])
        return w

    def array(self, name, shape, scale):
        self[name] = _uniform(self.rng, shape, scale)
        return _f64(self[name])


def _module_weights(module, suffix="_l0"):
    """The float64 arrays of one layer/direction of an nn.RNN/GRU/LSTM."""
    return {array: _f64(getattr(module, array + suffix))
            for array in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}


def _recurrent_ref(kind, x, w, h0=None, c0=None, function="tanh",
                   reset_before=False):
    """Runs one recurrent layer over one sequence x [T, I], step by step.
    kind: "rnn", "gru" or "lstm". Returns (states [T, H], cells [T, H] or
    None)."""
    hidden = w["weight_hh"].shape[1]
    h = torch.zeros(hidden, dtype=torch.float64) if h0 is None else _f64(h0)
    c = torch.zeros(hidden, dtype=torch.float64) if c0 is None else _f64(c0)
    states, cells = [], []
    for xt in x:
        gx = w["weight_ih"] @ xt + w["bias_ih"]
        gh = w["weight_hh"] @ h + w["bias_hh"]
        if kind == "rnn":
            pre = gx + gh
            h = torch.tanh(pre) if function == "tanh" else torch.relu(pre)
        elif kind == "gru":
            r = torch.sigmoid(gx[:hidden] + gh[:hidden])
            z = torch.sigmoid(gx[hidden:2 * hidden] + gh[hidden:2 * hidden])
            if reset_before:
                w_hn = w["weight_hh"][2 * hidden:]
                n = torch.tanh(gx[2 * hidden:] + w_hn @ (r * h)
                               + w["bias_hh"][2 * hidden:])
            else:
                n = torch.tanh(gx[2 * hidden:] + r * gh[2 * hidden:])
            h = (1 - z) * n + z * h
        else:
            g = gx + gh
            i = torch.sigmoid(g[:hidden])
            f = torch.sigmoid(g[hidden:2 * hidden])
            gg = torch.tanh(g[2 * hidden:3 * hidden])
            o = torch.sigmoid(g[3 * hidden:])
            c = f * c + i * gg
            h = o * torch.tanh(c)
            cells.append(c)
        states.append(h)
    return torch.stack(states), (torch.stack(cells) if cells else None)


def _module_ref(module, seqs):
    """Runs an nn.RNN/GRU/LSTM (any layers, directions) in float64 on a
    packed batch; returns the per-sequence outputs."""
    module = copy.deepcopy(module).double().eval()
    x, lengths = rx.pad_batch(seqs, tokens=False)
    x = x.double()
    if not module.batch_first:
        x = x.transpose(0, 1)
    packed = pack_padded_sequence(x, lengths, batch_first=module.batch_first,
                                  enforce_sorted=False)
    with torch.no_grad():
        out, _ = module(packed)
    out, _ = pad_packed_sequence(out, batch_first=True)
    return [out[i, :n] for i, n in enumerate(lengths.tolist())]


def _chain_case(net, inputs, outputs):
    """A case exported from a SequenceNet (input "input", output "output").
    `outputs` are the float64 references; the float32 SequenceNet must agree
    with them, and the exported files must load back to the same net."""
    return {"net": net, "inputs": inputs, "outputs": outputs}


def _run_chain(net, seqs, tokens):
    x, lengths = rx.pad_batch(seqs, tokens=tokens)
    with torch.no_grad():
        out, out_lengths = net.forward_with_lengths(x, lengths)
    if net.ends_with_sequence:
        return [out[i, :n].numpy() for i, n in enumerate(out_lengths.tolist())]
    return out.numpy()


def _vector_input(seqs):
    return ("input", "vectors", seqs)


# Chain cases, exported by tools/rnnserve_export.py ------------------------


def _case_lstm_stack_2(rng):
    lstm = nn.LSTM(IN, HIDDEN, num_layers=2, batch_first=True, dropout=0.25)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    return _chain_case(_vectors_net([lstm]), [_vector_input(seqs)],
                       [("output", _module_ref(lstm, seqs))])


def _case_gru_stack_3(rng):
    gru = nn.GRU(IN, HIDDEN, num_layers=3)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    return _chain_case(_vectors_net([gru]), [_vector_input(seqs)],
                       [("output", _module_ref(gru, seqs))])


def _case_bilstm_2layer(rng):
    embedding = nn.Embedding(VOCAB, 6)
    lstm = nn.LSTM(6, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
    tokens = [rng.randint(0, VOCAB, n).astype(np.int64)
              for n in _graph_lengths(rng)]
    vectors = [_f64(embedding.weight)[torch.from_numpy(t)].numpy() for t in tokens]
    return _chain_case(rx.SequenceNet([embedding, lstm]),
                       [("input", "tokens", tokens)],
                       [("output", _module_ref(lstm, vectors))])


def _case_rnn_relu_stack_2(rng):
    rnn = nn.RNN(IN, HIDDEN, num_layers=2, nonlinearity="relu", batch_first=True)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    return _chain_case(_vectors_net([rnn]), [_vector_input(seqs)],
                       [("output", _module_ref(rnn, seqs))])


def _case_bigru_3layer(rng):
    # Stacked bidirectional GRU, batch-major, with inter-layer dropout
    # (ignored at inference).
    gru = nn.GRU(IN, HIDDEN, num_layers=3, bidirectional=True, batch_first=True,
                 dropout=0.5)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    return _chain_case(_vectors_net([gru]), [_vector_input(seqs)],
                       [("output", _module_ref(gru, seqs))])


def _case_birnn_2layer(rng):
    rnn = nn.RNN(IN, HIDDEN, num_layers=2, nonlinearity="tanh",
                 bidirectional=True)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    return _chain_case(_vectors_net([rnn]), [_vector_input(seqs)],
                       [("output", _module_ref(rnn, seqs))])


def _case_bigru(rng):
    gru = nn.GRU(IN, HIDDEN, bidirectional=True)
    linear = nn.Linear(2 * HIDDEN, 3)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    last = torch.stack([y[-1] for y in _module_ref(gru, seqs)])
    expected = last @ _f64(linear.weight).T + _f64(linear.bias)
    return _chain_case(_vectors_net([gru, rx.SequenceLast(), linear]),
                       [_vector_input(seqs)], [("output", expected)])


def _bidirectional_ref(fwd, bwd, seqs, join):
    """Forward module over each sequence; backward module over each sequence
    reversed, its outputs re-reversed; joined."""
    kinds = {nn.RNN: "rnn", nn.GRU: "gru", nn.LSTM: "lstm"}
    out = []
    for x in seqs:
        x = _f64(x)
        f = x
        for k in range(fwd.num_layers):
            f, _ = _recurrent_ref(kinds[type(fwd)], f, _module_weights(fwd, "_l%d" % k),
                                  function=getattr(fwd, "nonlinearity", "tanh"))
        b = torch.flip(x, [0])
        for k in range(bwd.num_layers):
            b, _ = _recurrent_ref(kinds[type(bwd)], b, _module_weights(bwd, "_l%d" % k),
                                  function=getattr(bwd, "nonlinearity", "tanh"))
        b = torch.flip(b, [0])
        if join == "catenate":
            out.append(torch.cat([f, b], dim=1))
        elif join == "total":
            out.append(f + b)
        else:
            out.append((f + b) / 2)
    return out


def _bidirectional_case(rng, fwd, bwd, join):
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    return _chain_case(_vectors_net([rx.Bidirectional(fwd, bwd, join=join)]),
                       [_vector_input(seqs)],
                       [("output", _bidirectional_ref(fwd, bwd, seqs, join))])


def _case_bidirectional_total(rng):
    return _bidirectional_case(rng, nn.LSTM(IN, HIDDEN),
                               nn.LSTM(IN, HIDDEN, batch_first=True), "total")


def _case_bidirectional_mean(rng):
    return _bidirectional_case(rng, nn.LSTM(IN, HIDDEN, batch_first=True),
                               nn.LSTM(IN, HIDDEN), "mean")


def _case_bidirectional_mixed(rng):
    # A backward net of another structure: RNN forward, two-layer GRU back.
    return _bidirectional_case(rng, nn.RNN(IN, HIDDEN, nonlinearity="relu"),
                               nn.GRU(IN, HIDDEN, num_layers=2), "catenate")


def _case_map(rng):
    lstm = nn.LSTM(IN, HIDDEN, batch_first=True)
    first, second = nn.Linear(HIDDEN, 6), nn.Linear(6, 4)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    expected = []
    for x in seqs:
        h, _ = _recurrent_ref("lstm", _f64(x), _module_weights(lstm))
        y = torch.tanh(h @ _f64(first.weight).T + _f64(first.bias))
        expected.append(y @ _f64(second.weight).T + _f64(second.bias))
    net = _vectors_net([lstm, rx.Map([first, nn.Tanh(), second])])
    return _chain_case(net, [_vector_input(seqs)], [("output", expected)])


def _case_seq_most(rng):
    gru = nn.GRU(IN, HIDDEN, batch_first=True)
    seqs = _seqs(rng, _graph_lengths(rng, shortest=2), IN)
    expected = [_recurrent_ref("gru", _f64(x[:-1]), _module_weights(gru))[0]
                for x in seqs]
    return _chain_case(_vectors_net([rx.SequenceMost(), gru]),
                       [_vector_input(seqs)], [("output", expected)])


def _case_seq_rest(rng):
    lstm = nn.LSTM(IN, HIDDEN, batch_first=True)
    seqs = _seqs(rng, _graph_lengths(rng, shortest=2), IN)
    expected = [_recurrent_ref("lstm", _f64(x[1:]), _module_weights(lstm))[0]
                for x in seqs]
    return _chain_case(_vectors_net([rx.SequenceRest(), lstm]),
                       [_vector_input(seqs)], [("output", expected)])


def _case_seq_reverse(rng):
    # Reverse, run an LSTM, reverse its states back, then a linear map.
    lstm = nn.LSTM(IN, HIDDEN, batch_first=True)
    linear = nn.Linear(HIDDEN, 3)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    expected = []
    for x in seqs:
        h, _ = _recurrent_ref("lstm", torch.flip(_f64(x), [0]), _module_weights(lstm))
        expected.append(torch.flip(h, [0]) @ _f64(linear.weight).T + _f64(linear.bias))
    net = _vectors_net([rx.SequenceReverse(), lstm, rx.SequenceReverse(), linear])
    return _chain_case(net, [_vector_input(seqs)], [("output", expected)])


# Hand-written graphs --------------------------------------------------------


def _seq_input(name, width):
    return {"name": name, "kind": "VECTOR_SEQUENCE", "width": width}


def _vec_input(name, width):
    return {"name": name, "kind": "VECTOR", "width": width}


def _layer(name, ltype, inputs=None, **fields):
    layer = {"name": name, "type": ltype}
    if inputs:
        layer["inputs"] = list(inputs)
    layer.update(fields)
    return layer


def _graph_case(spec, arrays, inputs, outputs):
    return {"spec": spec, "arrays": arrays, "inputs": inputs, "outputs": outputs}


def _mgu_cell(arrays, prefix):
    """A minimal gated unit as a NetFold cell, and its reference step:
    f = sigmoid(W_f [x, h] + b_f); c = tanh(W_c [x, f h] + b_c);
    h' = (1 - f) h + f c."""
    wf, bf = arrays.linear(prefix + "f_linear", HIDDEN, IN + HIDDEN)
    wc, bc = arrays.linear(prefix + "c_linear", HIDDEN, IN + HIDDEN)
    cell = {
        "inputs": [_vec_input("x", IN), _vec_input("h", HIDDEN)],
        "layers": [
            _layer("xh", "CatenateLayer", ["x", "h"]),
            _layer("f_linear", "LinearLayer", size=HIDDEN),
            _layer("f", "ElementwiseLayer", function="sigmoid"),
            _layer("fh", "TimesLayer", ["f", "h"]),
            _layer("xfh", "CatenateLayer", ["x", "fh"]),
            _layer("c_linear", "LinearLayer", size=HIDDEN),
            _layer("candidate", "ElementwiseLayer", function="tanh"),
            _layer("keep", "ElementwiseLayer", ["f"], function="one_minus"),
            _layer("old", "TimesLayer", ["keep", "h"]),
            _layer("new", "TimesLayer", ["f", "candidate"]),
            _layer("h_next", "TotalLayer", ["old", "new"]),
        ],
        "outputs": [{"name": "h", "source": "h_next"}],
    }

    def step(x, h):
        f = torch.sigmoid(wf @ torch.cat([x, h]) + bf)
        c = torch.tanh(wc @ torch.cat([x, f * h]) + bc)
        return (1 - f) * h + f * c

    return cell, step


def _mgu_states(step, x):
    h = torch.zeros(HIDDEN, dtype=torch.float64)
    states = []
    for xt in _f64(x):
        h = step(xt, h)
        states.append(h)
    return torch.stack(states)


def _case_fold_mgu(rng):
    arrays = _Arrays(rng)
    cell, step = _mgu_cell(arrays, "fold.")
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    spec = {"name": "fold_mgu", "inputs": [_seq_input("input", IN)],
            "layers": [_layer("fold", "NetFoldOperator", net=cell)],
            "outputs": [{"name": "output", "source": "fold"}]}
    expected = torch.stack([_mgu_states(step, x)[-1] for x in seqs])
    return _graph_case(spec, arrays, [_vector_input(seqs)], [("output", expected)])


def _case_foldlist_mgu(rng):
    arrays = _Arrays(rng)
    cell, step = _mgu_cell(arrays, "fold.")
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    spec = {"name": "foldlist_mgu", "inputs": [_seq_input("input", IN)],
            "layers": [_layer("fold", "NetFoldListOperator", net=cell)],
            "outputs": [{"name": "output", "source": "fold.h"}]}
    expected = [_mgu_states(step, x) for x in seqs]
    return _graph_case(spec, arrays, [_vector_input(seqs)], [("output", expected)])


def _peephole_cell(arrays, prefix):
    """An LSTM with diagonal peepholes (two states, h and c; each peephole a
    ConstantTimesLayer) as a NetFold cell, and its reference step:
    i = sigmoid(W_i [x, h] + b_i + p_i c), f = sigmoid(W_f [x, h] + b_f + p_f c),
    g = tanh(W_g [x, h] + b_g), c' = f c + i g,
    o = sigmoid(W_o [x, h] + b_o + p_o c'), h' = o tanh(c')."""
    w = {}
    for gate in "ifgo":
        w[gate] = arrays.linear(prefix + gate + "_linear", HIDDEN, IN + HIDDEN)
    p = {gate: arrays.array(prefix + gate + "_peep.scaling", (HIDDEN,), 1.0)
         for gate in "ifo"}
    layers = [_layer("xh", "CatenateLayer", ["x", "h"])]
    for gate, state in (("i", "c"), ("f", "c")):
        layers += [
            _layer(gate + "_linear", "LinearLayer", ["xh"], size=HIDDEN),
            _layer(gate + "_peep", "ConstantTimesLayer", [state]),
            _layer(gate + "_sum", "TotalLayer", [gate + "_linear", gate + "_peep"]),
            _layer(gate, "ElementwiseLayer", function="sigmoid"),
        ]
    layers += [
        _layer("g_linear", "LinearLayer", ["xh"], size=HIDDEN),
        _layer("g", "ElementwiseLayer", function="tanh"),
        _layer("fc", "TimesLayer", ["f", "c"]),
        _layer("ig", "TimesLayer", ["i", "g"]),
        _layer("c_next", "TotalLayer", ["fc", "ig"]),
        _layer("o_linear", "LinearLayer", ["xh"], size=HIDDEN),
        _layer("o_peep", "ConstantTimesLayer", ["c_next"]),
        _layer("o_sum", "TotalLayer", ["o_linear", "o_peep"]),
        _layer("o", "ElementwiseLayer", function="sigmoid"),
        _layer("c_tanh", "ElementwiseLayer", ["c_next"], function="tanh"),
        _layer("h_next", "TimesLayer", ["o", "c_tanh"]),
    ]
    cell = {"inputs": [_vec_input("x", IN), _vec_input("h", HIDDEN),
                       _vec_input("c", HIDDEN)],
            "layers": layers,
            "outputs": [{"name": "h", "source": "h_next"},
                        {"name": "c", "source": "c_next"}]}

    def step(x, h, c):
        xh = torch.cat([x, h])
        i = torch.sigmoid(w["i"][0] @ xh + w["i"][1] + p["i"] * c)
        f = torch.sigmoid(w["f"][0] @ xh + w["f"][1] + p["f"] * c)
        g = torch.tanh(w["g"][0] @ xh + w["g"][1])
        c = f * c + i * g
        o = torch.sigmoid(w["o"][0] @ xh + w["o"][1] + p["o"] * c)
        return o * torch.tanh(c), c

    return cell, step


def _case_fold_peephole_lstm(rng):
    # Two states with initial values from VECTOR inputs, through both a
    # NetFoldListOperator (state sequences) and a NetFoldOperator (finals).
    arrays = _Arrays(rng)
    list_cell, list_step = _peephole_cell(arrays, "foldlist.")
    fold_cell, fold_step = _peephole_cell(arrays, "fold.")
    lengths = _graph_lengths(rng)
    seqs = _seqs(rng, lengths, IN)
    h0 = (0.5 * rng.standard_normal((BATCH, HIDDEN))).astype(np.float32)
    c0 = rng.standard_normal((BATCH, HIDDEN)).astype(np.float32)
    spec = {
        "name": "fold_peephole_lstm",
        "inputs": [_seq_input("input", IN), _vec_input("h0", HIDDEN),
                   _vec_input("c0", HIDDEN)],
        "layers": [
            _layer("foldlist", "NetFoldListOperator", ["input", "h=h0", "c=c0"],
                   net=list_cell),
            _layer("fold", "NetFoldOperator", ["input=input", "c=c0", "h=h0"],
                   net=fold_cell),
        ],
        "outputs": [{"name": "states", "source": "foldlist"},
                    {"name": "cells", "source": "foldlist.c"},
                    {"name": "final_h", "source": "fold.h"},
                    {"name": "final_c", "source": "fold.c"}],
    }
    states, cells, final_h, final_c = [], [], [], []
    for b, x in enumerate(seqs):
        for step, keep in ((list_step, True), (fold_step, False)):
            h, c = _f64(h0[b]), _f64(c0[b])
            hs, cs = [], []
            for xt in _f64(x):
                h, c = step(xt, h, c)
                hs.append(h)
                cs.append(c)
            if keep:
                states.append(torch.stack(hs))
                cells.append(torch.stack(cs))
            else:
                final_h.append(h)
                final_c.append(c)
    return _graph_case(
        spec, arrays,
        [_vector_input(seqs), ("h0", "vector", h0), ("c0", "vector", c0)],
        [("states", states), ("cells", cells), ("final_h", torch.stack(final_h)),
         ("final_c", torch.stack(final_c))])


def _case_foldlist_indrnn(rng):
    # An independently recurrent network (IndRNN) as a NetFoldList cell:
    # h' = relu(W x + b + u * h), the recurrent weight u a vector applied by
    # a ConstantTimesLayer; initial states from a VECTOR input, and a
    # ConstantPlusLayer on the state sequence after it.
    arrays = _Arrays(rng)
    w, b = arrays.linear("indrnn.x_linear", HIDDEN, IN)
    u = arrays.array("indrnn.recurrence.scaling", (HIDDEN,), 1.0)
    shift = arrays.array("shift.bias", (HIDDEN,), 1.0)
    cell = {"inputs": [_vec_input("x", IN), _vec_input("h", HIDDEN)],
            "layers": [
                _layer("x_linear", "LinearLayer", ["x"], size=HIDDEN),
                _layer("recurrence", "ConstantTimesLayer", ["h"]),
                _layer("sum", "TotalLayer", ["x_linear", "recurrence"]),
                _layer("h_next", "ElementwiseLayer", function="relu"),
            ],
            "outputs": [{"name": "h", "source": "h_next"}]}
    lengths = _graph_lengths(rng)
    seqs = _seqs(rng, lengths, IN)
    h0 = rng.uniform(0, 1, (BATCH, HIDDEN)).astype(np.float32)
    spec = {"name": "foldlist_indrnn",
            "inputs": [_seq_input("input", IN), _vec_input("h0", HIDDEN)],
            "layers": [_layer("indrnn", "NetFoldListOperator",
                              ["input", "h=h0"], net=cell),
                       _layer("shift", "ConstantPlusLayer")],
            "outputs": [{"name": "states", "source": "indrnn"},
                        {"name": "shifted", "source": "shift"}]}
    states = []
    for i, x in enumerate(seqs):
        h = _f64(h0[i])
        hs = []
        for xt in _f64(x):
            h = torch.relu(w @ xt + b + u * h)
            hs.append(h)
        states.append(torch.stack(hs))
    return _graph_case(
        spec, arrays, [_vector_input(seqs), ("h0", "vector", h0)],
        [("states", states), ("shifted", [s + shift for s in states])])


def _case_constant(rng):
    # ConstantTimesLayer and ConstantPlusLayer on a sequence and on a vector.
    arrays = _Arrays(rng)
    scale = arrays.array("scale.scaling", (IN,), 2.0)
    shift = arrays.array("shift.bias", (IN,), 2.0)
    vshift = arrays.array("vshift.bias", (IN,), 2.0)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    spec = {"name": "constant", "inputs": [_seq_input("input", IN)],
            "layers": [_layer("scale", "ConstantTimesLayer"),
                       _layer("shift", "ConstantPlusLayer"),
                       _layer("last", "SequenceLastLayer", ["scale"]),
                       _layer("vshift", "ConstantPlusLayer")],
            "outputs": [{"name": "output", "source": "shift"},
                        {"name": "last", "source": "vshift"}]}
    scaled = [_f64(x) * scale for x in seqs]
    return _graph_case(
        spec, arrays, [_vector_input(seqs)],
        [("output", [y + shift for y in scaled]),
         ("last", torch.stack([y[-1] + vshift for y in scaled]))])


def _nest_case(rng, name, list_op):
    arrays = _Arrays(rng)
    lstm = arrays.recurrent("lstm", 4, HIDDEN, IN)
    w, b = arrays.linear("nest.linear", HIDDEN, HIDDEN)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    body = {"inputs": [_vec_input("v", HIDDEN)],
            "layers": [_layer("linear", "LinearLayer", size=HIDDEN),
                       _layer("tanh", "ElementwiseLayer", function="tanh")]}
    spec = {"name": name, "inputs": [_seq_input("input", IN)],
            "layers": [_layer("lstm", "LongShortTermMemoryLayer", size=HIDDEN),
                       _layer("last", "SequenceLastLayer"),
                       _layer("nest", "NetNestListOperator" if list_op
                              else "NetNestOperator", iterations=3, net=body)],
            "outputs": [{"name": "output", "source": "nest"}]}
    expected = []
    for x in seqs:
        v = _recurrent_ref("lstm", _f64(x), lstm)[0][-1]
        iterates = []
        for _ in range(3):
            v = torch.tanh(w @ v + b)
            iterates.append(v)
        expected.append(torch.stack(iterates) if list_op else v)
    if not list_op:
        expected = torch.stack(expected)
    return _graph_case(spec, arrays, [_vector_input(seqs)], [("output", expected)])


def _case_nest(rng):
    return _nest_case(rng, "nest", False)


def _case_nest_list(rng):
    # Each instance's output is the sequence of its 3 iterates, the first
    # being one application of the sub-net.
    return _nest_case(rng, "nest_list", True)


def _case_nest_sequence(rng):
    # NetNestOperator over a sequence: the sub-net keeps the lengths.
    arrays = _Arrays(rng)
    w, b = arrays.linear("nest.linear", IN, IN)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    body = {"inputs": [_seq_input("x", IN)],
            "layers": [_layer("linear", "LinearLayer", size=IN),
                       _layer("tanh", "ElementwiseLayer", function="tanh")]}
    spec = {"name": "nest_sequence", "inputs": [_seq_input("input", IN)],
            "layers": [_layer("nest", "NetNestOperator", iterations=4, net=body)],
            "outputs": [{"name": "output"}]}
    expected = []
    for x in seqs:
        y = _f64(x)
        for _ in range(4):
            y = torch.tanh(y @ w.T + b)
        expected.append(y)
    return _graph_case(spec, arrays, [_vector_input(seqs)], [("output", expected)])


def _attention(scores, values):
    weights = torch.softmax(scores, dim=0)
    return weights @ values, weights.unsqueeze(1)


def _case_attention_dot(rng):
    arrays = _Arrays(rng)
    lstm = arrays.recurrent("lstm", 4, HIDDEN, IN)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    query = (2 * rng.standard_normal((BATCH, HIDDEN))).astype(np.float32)
    spec = {"name": "attention_dot",
            "inputs": [_seq_input("input", IN), _vec_input("query", HIDDEN)],
            "layers": [_layer("lstm", "LongShortTermMemoryLayer", ["input"], size=HIDDEN),
                       _layer("att", "AttentionLayer", ["query=query", "keys=lstm"],
                              score="dot")],
            "outputs": [{"name": "output", "source": "att"},
                        {"name": "weights", "source": "att.weights"}]}
    contexts, weights = [], []
    for b, x in enumerate(seqs):
        keys = _recurrent_ref("lstm", _f64(x), lstm)[0]
        c, a = _attention(keys @ _f64(query[b]), keys)
        contexts.append(c)
        weights.append(a)
    return _graph_case(spec, arrays, [_vector_input(seqs), ("query", "vector", query)],
                       [("output", torch.stack(contexts)), ("weights", weights)])


def _case_attention_general(rng):
    # Scores over the GRU's states, weights applied to the raw elements (a
    # values sequence of another width than the keys).
    arrays = _Arrays(rng)
    query_width = 6
    gru = arrays.recurrent("gru", 3, HIDDEN, IN)
    w = arrays.array("att.weight", (query_width, HIDDEN), 1.0)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    query = rng.standard_normal((BATCH, query_width)).astype(np.float32)
    spec = {"name": "attention_general",
            "inputs": [_seq_input("input", IN), _vec_input("query", query_width)],
            "layers": [_layer("gru", "GatedRecurrentLayer", size=HIDDEN),
                       _layer("att", "AttentionLayer",
                              ["keys=gru", "query=query", "values=input"],
                              score="general")],
            "outputs": [{"name": "output", "source": "att.output"},
                        {"name": "weights", "source": "att.weights"}]}
    contexts, weights = [], []
    for b, x in enumerate(seqs):
        keys = _recurrent_ref("gru", _f64(x), gru)[0]
        c, a = _attention(keys @ w.T @ _f64(query[b]), _f64(x))
        contexts.append(c)
        weights.append(a)
    return _graph_case(spec, arrays, [_vector_input(seqs), ("query", "vector", query)],
                       [("output", torch.stack(contexts)), ("weights", weights)])


def _case_attention_additive(rng):
    # Query: the last state of the keys' LSTM; values: a linear map of the
    # input sequence, of another width.
    arrays = _Arrays(rng)
    size = 5
    lstm = arrays.recurrent("lstm", 4, HIDDEN, IN)
    wp, bp = arrays.linear("proj", 3, IN)
    wq = arrays.array("att.query_weight", (size, HIDDEN), 0.8)
    wk = arrays.array("att.key_weight", (size, HIDDEN), 0.8)
    bias = arrays.array("att.bias", (size,), 0.5)
    v = arrays.array("att.vector", (size,), 2.0)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    spec = {"name": "attention_additive",
            "inputs": [_seq_input("input", IN)],
            "layers": [_layer("lstm", "LongShortTermMemoryLayer", size=HIDDEN),
                       _layer("last", "SequenceLastLayer"),
                       _layer("proj", "LinearLayer", ["input"], size=3),
                       _layer("att", "AttentionLayer",
                              ["query=last", "keys=lstm", "values=proj"],
                              score="additive", size=size)],
            "outputs": [{"name": "output", "source": "att"},
                        {"name": "weights", "source": "att.weights"}]}
    contexts, weights = [], []
    for x in seqs:
        keys = _recurrent_ref("lstm", _f64(x), lstm)[0]
        q = keys[-1]
        scores = torch.tanh(keys @ wk.T + wq @ q + bias) @ v
        c, a = _attention(scores, _f64(x) @ wp.T + bp)
        contexts.append(c)
        weights.append(a)
    return _graph_case(spec, arrays, [_vector_input(seqs)],
                       [("output", torch.stack(contexts)), ("weights", weights)])


def _case_lstm_states(rng):
    arrays = _Arrays(rng)
    w = arrays.recurrent("lstm", 4, HIDDEN, IN)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    h0 = (0.5 * rng.standard_normal((BATCH, HIDDEN))).astype(np.float32)
    c0 = rng.standard_normal((BATCH, HIDDEN)).astype(np.float32)
    spec = {"name": "lstm_states",
            "inputs": [_seq_input("input", IN), _vec_input("h0", HIDDEN),
                       _vec_input("c0", HIDDEN)],
            "layers": [_layer("lstm", "LongShortTermMemoryLayer",
                              ["input", "state=h0", "cell=c0"], size=HIDDEN)],
            "outputs": [{"name": "output", "source": "lstm"},
                        {"name": "state", "source": "lstm.state"},
                        {"name": "cell", "source": "lstm.cell"},
                        {"name": "cells", "source": "lstm.cells"}]}
    # Outputs and final states from nn.LSTM on the packed batch; the cell
    # sequence from an explicit loop.
    module = nn.LSTM(IN, HIDDEN, batch_first=True).double()
    with torch.no_grad():
        for name, value in w.items():
            getattr(module, name + "_l0").copy_(value)
    x, lengths = rx.pad_batch(seqs, tokens=False)
    packed = pack_padded_sequence(x.double(), lengths, batch_first=True,
                                  enforce_sorted=False)
    with torch.no_grad():
        out, (hn, cn) = module(packed, (_f64(h0).unsqueeze(0), _f64(c0).unsqueeze(0)))
    out, _ = pad_packed_sequence(out, batch_first=True)
    outputs = [out[i, :n] for i, n in enumerate(lengths.tolist())]
    cells = [_recurrent_ref("lstm", _f64(s), w, h0[b], c0[b])[1]
             for b, s in enumerate(seqs)]
    return _graph_case(
        spec, arrays,
        [_vector_input(seqs), ("h0", "vector", h0), ("c0", "vector", c0)],
        [("output", outputs), ("state", hn[0]), ("cell", cn[0]), ("cells", cells)])


def _init_state_case(rng, name, kind):
    arrays = _Arrays(rng)
    gates = {"rnn": 1, "gru": 3}[kind]
    ltype = {"rnn": "BasicRecurrentLayer", "gru": "GatedRecurrentLayer"}[kind]
    w = arrays.recurrent(kind, gates, HIDDEN, IN)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    h0 = rng.standard_normal((BATCH, HIDDEN)).astype(np.float32)
    spec = {"name": name,
            "inputs": [_seq_input("input", IN), _vec_input("h0", HIDDEN)],
            "layers": [_layer(kind, ltype, ["input", "state=h0"], size=HIDDEN)],
            "outputs": [{"name": "output", "source": kind},
                        {"name": "state", "source": kind + ".state"}]}
    module = (nn.RNN if kind == "rnn" else nn.GRU)(IN, HIDDEN, batch_first=True).double()
    with torch.no_grad():
        for array, value in w.items():
            getattr(module, array + "_l0").copy_(value)
    x, lengths = rx.pad_batch(seqs, tokens=False)
    packed = pack_padded_sequence(x.double(), lengths, batch_first=True,
                                  enforce_sorted=False)
    with torch.no_grad():
        out, hn = module(packed, _f64(h0).unsqueeze(0))
    out, _ = pad_packed_sequence(out, batch_first=True)
    outputs = [out[i, :n] for i, n in enumerate(lengths.tolist())]
    return _graph_case(spec, arrays, [_vector_input(seqs), ("h0", "vector", h0)],
                       [("output", outputs), ("state", hn[0])])


def _case_rnn_init_state(rng):
    return _init_state_case(rng, "rnn_init_state", "rnn")


def _case_gru_init_state(rng):
    return _init_state_case(rng, "gru_init_state", "gru")


def _case_states_h64_b12(rng):
    # Initial and final states where the recurrent step takes its fused
    # forms (a state of 64 units, a whole panel; a batch of 12, projected
    # inside each step): tanh and relu RNNs, both GRU forms and the LSTM,
    # side by side on one input, each with its own initial state.
    hidden, batch = 64, 12
    lengths = [1, 14, 14] + [int(v) for v in rng.randint(1, 15, batch - 3)]
    rng.shuffle(lengths)
    seqs = _seqs(rng, lengths, IN)
    arrays = _Arrays(rng)
    kinds = [("rnn_tanh", "rnn", "BasicRecurrentLayer", 1, {}),
             ("rnn_relu", "rnn", "BasicRecurrentLayer", 1, {"function": "relu"}),
             ("gru", "gru", "GatedRecurrentLayer", 3, {}),
             ("gru_rb", "gru", "GatedRecurrentLayer", 3, {"reset_before": True}),
             ("lstm", "lstm", "LongShortTermMemoryLayer", 4, {})]
    inputs = [_vector_input(seqs)]
    spec_inputs = [_seq_input("input", IN)]
    layers, outputs, expected = [], [], []
    for name, kind, ltype, gates, fields in kinds:
        w = arrays.recurrent(name, gates, hidden, IN)
        h0 = (0.5 * rng.standard_normal((batch, hidden))).astype(np.float32)
        wiring = ["input", "state=h0_" + name]
        spec_inputs.append(_vec_input("h0_" + name, hidden))
        inputs.append(("h0_" + name, "vector", h0))
        c0 = None
        if kind == "lstm":
            c0 = rng.standard_normal((batch, hidden)).astype(np.float32)
            wiring.append("cell=c0_" + name)
            spec_inputs.append(_vec_input("c0_" + name, hidden))
            inputs.append(("c0_" + name, "vector", c0))
        layers.append(_layer(name, ltype, wiring, size=hidden, **fields))
        runs = [_recurrent_ref(kind, _f64(x), w, h0[b],
                               None if c0 is None else c0[b],
                               function=fields.get("function", "tanh"),
                               reset_before=fields.get("reset_before", False))
                for b, x in enumerate(seqs)]
        outputs += [{"name": name, "source": name},
                    {"name": name + "_state", "source": name + ".state"}]
        expected += [(name, [hs for hs, _ in runs]),
                     (name + "_state", torch.stack([hs[-1] for hs, _ in runs]))]
        if kind == "lstm":
            outputs += [{"name": name + "_cell", "source": name + ".cell"},
                        {"name": name + "_cells", "source": name + ".cells"}]
            expected += [(name + "_cell", torch.stack([cs[-1] for _, cs in runs])),
                         (name + "_cells", [cs for _, cs in runs])]
    spec = {"name": "states_h64_b12", "inputs": spec_inputs, "layers": layers,
            "outputs": outputs}
    return _graph_case(spec, arrays, inputs, expected)


def _case_gru_reset_before(rng):
    arrays = _Arrays(rng)
    w = arrays.recurrent("gru", 3, HIDDEN, IN)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    spec = {"name": "gru_reset_before", "inputs": [_seq_input("input", IN)],
            "layers": [_layer("gru", "GatedRecurrentLayer", size=HIDDEN,
                              reset_before=True)],
            "outputs": [{"name": "output"}]}
    expected = [_recurrent_ref("gru", _f64(x), w, reset_before=True)[0] for x in seqs]
    return _graph_case(spec, arrays, [_vector_input(seqs)], [("output", expected)])


def _case_glue(rng):
    # Row-wise combinations, on sequences and then on vectors.
    arrays = _Arrays(rng)
    wa, ba = arrays.linear("a", 6, IN)
    wb, bb = arrays.linear("b_linear", 4, IN)
    wc, bc = arrays.linear("c", 6, 10)
    lengths = _graph_lengths(rng)
    seqs = _seqs(rng, lengths, IN)
    extra = rng.standard_normal((BATCH, 6)).astype(np.float32)
    spec = {"name": "glue",
            "inputs": [_seq_input("input", IN), _vec_input("extra", 6)],
            "layers": [
                _layer("a", "LinearLayer", ["input"], size=6),
                _layer("b_linear", "LinearLayer", ["input"], size=4),
                _layer("b", "ElementwiseLayer", function="tanh"),
                _layer("cat", "CatenateLayer", ["a", "b"]),
                _layer("c", "LinearLayer", size=6),
                _layer("total", "TotalLayer", ["a", "c", "a"]),
                _layer("times", "TimesLayer", ["total", "c"]),
                _layer("diff", "SubtractLayer", ["times", "a"]),
                _layer("drop", "DropoutLayer", probability=0.3),
                _layer("shape", "ReshapeLayer", dimensions=[2, 3]),
                _layer("last", "SequenceLastLayer", ["cat"]),
                _layer("shape_last", "SequenceLastLayer", ["shape"]),
                _layer("vsum", "TotalLayer", ["shape_last", "extra"]),
                _layer("vdiff", "SubtractLayer", ["extra", "vsum"]),
                _layer("vcat", "CatenateLayer", ["vdiff", "last", "extra"]),
            ],
            "outputs": [{"name": "output", "source": "shape"},
                        {"name": "catenated", "source": "cat"},
                        {"name": "vector", "source": "vcat"}]}
    outs, cats, vecs = [], [], []
    for i, x in enumerate(seqs):
        x = _f64(x)
        a = x @ wa.T + ba
        b = torch.tanh(x @ wb.T + bb)
        cat = torch.cat([a, b], dim=1)
        c = cat @ wc.T + bc
        y = (a + c + a) * c - a
        outs.append(y)
        cats.append(cat)
        e = _f64(extra[i])
        vsum = y[-1] + e
        vecs.append(torch.cat([e - vsum, cat[-1], e]))
    return _graph_case(spec, arrays, [_vector_input(seqs), ("extra", "vector", extra)],
                       [("output", outs), ("catenated", cats),
                        ("vector", torch.stack(vecs))])


def _elementwise_case(rng, function, reference, scale):
    width = 9
    lengths = _graph_lengths(rng)
    seqs = _seqs(rng, lengths, width, scale)
    spec = {"name": "elementwise_" + function,
            "inputs": [_seq_input("input", width)],
            "layers": [_layer(function, "ElementwiseLayer", function=function)],
            "outputs": [{"name": "output"}]}
    return _graph_case(spec, _Arrays(rng), [_vector_input(seqs)],
                       [("output", [reference(_f64(x)) for x in seqs])])


def _case_elementwise_identity(rng):
    return _elementwise_case(rng, "identity", lambda x: x, 3.0)


def _case_elementwise_negate(rng):
    return _elementwise_case(rng, "negate", lambda x: -x, 3.0)


def _case_elementwise_one_minus(rng):
    return _elementwise_case(rng, "one_minus", lambda x: 1 - x, 0.5)


def _case_elementwise_exp(rng):
    # Inputs kept where exp stays below ~20, so 1e-5 is a few ulps.
    return _elementwise_case(rng, "exp", torch.exp, 1.0)


def _case_elementwise_square(rng):
    return _elementwise_case(rng, "square", lambda x: x * x, 1.0)


def _case_bidirectional_nested(rng):
    # A two-layer sub-net (LSTM, then a NetMapOperator) run both ways; no
    # backward_net, so the backward copy has the same structure and arrays
    # of its own.
    arrays = _Arrays(rng)
    parts = {}
    for part in ("forward", "backward"):
        lstm = arrays.recurrent("bi.%s.lstm" % part, 4, HIDDEN, IN)
        linear = arrays.linear("bi.%s.map.linear" % part, 4, HIDDEN)
        parts[part] = (lstm, linear)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    sub = {"inputs": [_seq_input("input", IN)],
           "layers": [_layer("lstm", "LongShortTermMemoryLayer", size=HIDDEN),
                      _layer("map", "NetMapOperator", net={
                          "inputs": [_vec_input("e", HIDDEN)],
                          "layers": [_layer("linear", "LinearLayer", size=4),
                                     _layer("tanh", "ElementwiseLayer",
                                            function="tanh")]})]}
    spec = {"name": "bidirectional_nested", "inputs": [_seq_input("input", IN)],
            "layers": [_layer("bi", "NetBidirectionalOperator", net=sub)],
            "outputs": [{"name": "output"}]}

    def run(part, x):
        lstm, (w, b) = parts[part]
        return torch.tanh(_recurrent_ref("lstm", x, lstm)[0] @ w.T + b)

    expected = []
    for x in seqs:
        x = _f64(x)
        f = run("forward", x)
        b = torch.flip(run("backward", torch.flip(x, [0])), [0])
        expected.append(torch.cat([f, b], dim=1))
    return _graph_case(spec, arrays, [_vector_input(seqs)], [("output", expected)])


def _case_bidirectional_last(rng):
    # Sub-nets that end in a vector (SequenceLast): the backward copy's is
    # its state after reading the whole sequence reversed; joined by mean.
    arrays = _Arrays(rng)
    fwd = arrays.recurrent("bi.forward.gru", 3, HIDDEN, IN)
    bwd = arrays.recurrent("bi.backward.gru", 3, HIDDEN, IN)
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    sub = {"inputs": [_seq_input("input", IN)],
           "layers": [_layer("gru", "GatedRecurrentLayer", size=HIDDEN),
                      _layer("last", "SequenceLastLayer")]}
    spec = {"name": "bidirectional_last", "inputs": [_seq_input("input", IN)],
            "layers": [_layer("bi", "NetBidirectionalOperator", net=sub,
                              backward_net=sub, join="mean")],
            "outputs": [{"name": "output"}]}
    expected = []
    for x in seqs:
        x = _f64(x)
        f = _recurrent_ref("gru", x, fwd)[0][-1]
        b = _recurrent_ref("gru", torch.flip(x, [0]), bwd)[0][-1]
        expected.append((f + b) / 2)
    return _graph_case(spec, arrays, [_vector_input(seqs)],
                       [("output", torch.stack(expected))])


# Graphs exported from rnnserve_export.GraphNet ------------------------------


def _exported_graph_case(net, inputs, outputs):
    """A case exported from a GraphNet; `outputs` are float64 references in
    the net's output order, which the float32 GraphNet must agree with."""
    return {"graph": net, "inputs": inputs, "outputs": outputs}


def _case_graph_glue(rng):
    # vectors -> (LSTM; Linear -> tanh) -> Catenate -> Linear.
    lstm = nn.LSTM(IN, HIDDEN, batch_first=True)
    side = nn.Linear(IN, 4)
    head = nn.Linear(HIDDEN + 4, 3)
    net = rx.GraphNet(
        inputs=[("input", "vectors", IN)],
        nodes=[("lstm", lstm, ["input"]),
               ("side", side, ["input"]),
               ("side_tanh", nn.Tanh(), ["side"]),
               ("joined", rx.Catenate(), ["lstm", "side_tanh"]),
               ("head", head, ["joined"])],
        outputs=[("output", "head")])
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    states = _module_ref(lstm, seqs)
    expected = []
    for x, h in zip(seqs, states):
        s = torch.tanh(_f64(x) @ _f64(side.weight).T + _f64(side.bias))
        expected.append(torch.cat([h, s], dim=1) @ _f64(head.weight).T
                        + _f64(head.bias))
    return _exported_graph_case(net, [_vector_input(seqs)], [("output", expected)])


def _case_graph_arith(rng):
    # Two same-width branches (a 2-layer GRU; Linear -> sigmoid) combined by
    # Total, Times and Subtract; a sequence output, a vector output and the
    # GRU's final state (its "state" port).
    gru = nn.GRU(IN, HIDDEN, num_layers=2, batch_first=True)
    side = nn.Linear(IN, HIDDEN)
    head = nn.Linear(HIDDEN, 2)
    net = rx.GraphNet(
        inputs=[("input", "vectors", IN)],
        nodes=[("gru", gru, ["input"]),
               ("side", side, ["input"]),
               ("gate", nn.Sigmoid(), ["side"]),
               ("sum", rx.Total(), ["gru", "gate", "gru"]),
               ("product", rx.Times(), ["sum", "gate"]),
               ("diff", rx.Subtract(), ["product", "gru"]),
               ("drop", nn.Dropout(0.5), ["diff"]),
               ("shape", rx.Reshape(HIDDEN, 1), ["drop"]),
               ("last", rx.SequenceLast(), ["shape"]),
               ("head", head, ["last"])],
        outputs=[("output", "diff"), ("summary", "head"), ("state", "gru.state")])
    seqs = _seqs(rng, _graph_lengths(rng), IN)
    states = _module_ref(gru, seqs)
    outs, heads = [], []
    for x, h in zip(seqs, states):
        g = torch.sigmoid(_f64(x) @ _f64(side.weight).T + _f64(side.bias))
        d = (h + g + h) * g - h
        outs.append(d)
        heads.append(d[-1] @ _f64(head.weight).T + _f64(head.bias))
    return _exported_graph_case(net, [_vector_input(seqs)],
                                [("output", outs), ("summary", torch.stack(heads)),
                                 ("state", torch.stack([h[-1] for h in states]))])


def _graph_cases():
    """(name, builder) for every graph case, in manifest order."""
    names = [
        "lstm_stack_2", "gru_stack_3", "rnn_relu_stack_2", "bilstm_2layer",
        "bigru", "bigru_3layer", "birnn_2layer",
        "bidirectional_total", "bidirectional_mean", "bidirectional_mixed",
        "bidirectional_nested", "bidirectional_last", "map",
        "fold_mgu", "foldlist_mgu", "fold_peephole_lstm", "foldlist_indrnn",
        "nest", "nest_list", "nest_sequence",
        "seq_most", "seq_rest", "seq_reverse",
        "attention_dot", "attention_general", "attention_additive",
        "lstm_states", "rnn_init_state", "gru_init_state", "gru_reset_before",
        "states_h64_b12",
        "glue", "constant", "elementwise_identity", "elementwise_negate",
        "elementwise_one_minus", "elementwise_exp", "elementwise_square",
        "graph_glue", "graph_arith",
    ]
    return [(name, globals()["_case_" + name]) for name in names]


def _as_rows(value):
    """A reference as float32 rows: a list of per-instance [T_i, D] arrays
    is concatenated, a [B, D] array kept."""
    if isinstance(value, (list, tuple)):
        value = np.concatenate([_f64(v).numpy() for v in value])
    else:
        value = _f64(value).numpy()
    value = np.ascontiguousarray(value, dtype=np.float32)
    if value.ndim != 2:
        raise ValueError("expected 2-D rows, got shape %s" % (value.shape,))
    return value


def make_graph_case(out_dir, name, build):
    seed = zlib.crc32(name.encode("ascii"))
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    case = build(rng)
    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)

    if "net" in case:
        net = case["net"].eval()
        rx.write_net(net, case_dir, name)
        # The float32 PyTorch net agrees with the float64 reference, and the
        # exported files load back into the very same net.
        (_, _, seqs), = case["inputs"]
        tokens = net.takes_tokens
        got = _run_chain(net, seqs, tokens)
        again = _run_chain(rx.load(case_dir), seqs, tokens)
        (_, reference), = case["outputs"]
        if not np.array_equal(_as_rows(got), _as_rows(again)):
            raise SystemExit("case %s: the exported net differs from the original"
                             % name)
        worst = np.abs(_as_rows(got) - _as_rows(reference)).max()
        if worst > 1e-5:
            raise SystemExit("case %s: the float32 net is %g away from the "
                             "float64 reference" % (name, worst))
    elif "graph" in case:
        net = case["graph"].eval()
        rx.write_net(net, case_dir, name)
        got = net.run({n: v for n, _, v in case["inputs"]})
        for output_name, reference in case["outputs"]:
            worst = np.abs(_as_rows(got[output_name]) - _as_rows(reference)).max()
            if worst > 1e-5:
                raise SystemExit("case %s: output %s of the float32 net is %g away "
                                 "from the float64 reference"
                                 % (name, output_name, worst))
    else:
        with open(os.path.join(case_dir, "net.pbtxt"), "w", encoding="utf-8") as f:
            f.write(rx.format_net(case["spec"]))
        rx.write_safetensors(os.path.join(case_dir, "weights.safetensors"),
                             dict(case["arrays"]))

    io = {}
    for input_name, kind, value in case["inputs"]:
        key = "input.%s." % input_name
        if kind == "vector":
            value = np.ascontiguousarray(value, dtype=np.float32)
            io[key + "lengths"] = np.ones(len(value), dtype=np.int64)
            io[key + "vectors"] = value
        elif kind == "tokens":
            io[key + "lengths"] = np.asarray([len(s) for s in value], dtype=np.int64)
            io[key + "tokens"] = np.concatenate(value).astype(np.int64)
        else:
            io[key + "lengths"] = np.asarray([len(s) for s in value], dtype=np.int64)
            io[key + "vectors"] = np.ascontiguousarray(np.concatenate(value),
                                                       dtype=np.float32)
    for output_name, value in case["outputs"]:
        rows = _as_rows(value)
        if not np.all(np.isfinite(rows)):
            raise SystemExit("case %s: non-finite expected values" % name)
        io["expected." + output_name] = rows
    rx.write_safetensors(os.path.join(case_dir, "io.safetensors"), io)


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
    for name, build in _graph_cases():
        make_graph_case(out_dir, name, build)
        names.append(name)
    with open(os.path.join(out_dir, "manifest.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    print("wrote %d parity cases to %s" % (len(names), out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
