#!/usr/bin/python3
"""Tests of rnnserve_export: what export writes, load reads back the same.

    /usr/bin/python3 tools/rnnserve_export_test.py
"""

import os
import re
import sys
import tempfile
import unittest

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rnnserve_export as rx  # noqa: E402

LENGTHS = [3, 1, 6, 2, 6, 4]


def _vectors(width, lengths=LENGTHS, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.standard_normal((n, width)).astype(np.float32) for n in lengths]


def _tokens(vocab, lengths=LENGTHS, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, vocab, n) for n in lengths]


class RoundTrip(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.tmp = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.tmp.cleanup()

    def round_trip(self, net, seqs, **kwargs):
        net.eval()
        version_dir = rx.export(net, self.tmp.name, "m", **kwargs)
        loaded = rx.load(version_dir)
        want = net.run(seqs)
        got = loaded.run(seqs)
        self.assertEqual(len(want), len(got))
        for a, b in zip(want, got):
            self.assertTrue(np.array_equal(a, b))
        with open(os.path.join(version_dir, "net.pbtxt")) as f:
            text = f.read()
        return loaded, text, rx.read_safetensors(
            os.path.join(version_dir, "weights.safetensors"))

    def test_plain_chain(self):
        net = rx.SequenceNet([nn.Embedding(9, 4), nn.LSTM(4, 6, batch_first=True),
                              rx.SequenceLast(), nn.Linear(6, 3), nn.Softmax(dim=-1)])
        loaded, _, _ = self.round_trip(net, _tokens(9), labels=["a", "b", "c"])
        self.assertEqual(loaded.labels, ["a", "b", "c"])

    def test_stacked_layers(self):
        lstm = nn.LSTM(5, 7, num_layers=3, dropout=0.3)
        gru = nn.GRU(7, 4, num_layers=2, batch_first=True, bias=False)
        net = rx.SequenceNet([lstm, gru])
        loaded, text, arrays = self.round_trip(net, _vectors(5))
        for name in ("lstm", "lstm_l1", "lstm_l2", "gru", "gru_l1"):
            self.assertIn('name: "%s"' % name, text)
        self.assertEqual(arrays["lstm_l2.weight_ih"].shape, (28, 7))
        self.assertFalse(arrays["gru_l1.bias_hh"].any())
        self.assertEqual([type(m) for m in loaded.layers], [nn.LSTM, nn.GRU])
        self.assertEqual(loaded.layers[0].num_layers, 3)
        self.assertEqual(loaded.layers[1].num_layers, 2)

    def test_two_stacked_modules_stay_apart(self):
        net = rx.SequenceNet([nn.RNN(5, 6, num_layers=2, nonlinearity="relu"),
                              nn.RNN(6, 6, num_layers=2)])
        loaded, text, _ = self.round_trip(net, _vectors(5))
        for name in ("rnn", "rnn_l1", "rnn_2", "rnn_2_l1"):
            self.assertIn('name: "%s"' % name, text)
        self.assertEqual([m.num_layers for m in loaded.layers], [2, 2])
        self.assertEqual(loaded.layers[0].nonlinearity, "relu")

    def test_bidirectional_module(self):
        lstm = nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True)
        net = rx.SequenceNet([lstm, rx.SequenceLast(), nn.Linear(12, 2)])
        loaded, text, arrays = self.round_trip(net, _vectors(5))
        self.assertIn('type: "NetBidirectionalOperator"', text)
        self.assertIn('name: "bilstm_l1"', text)
        self.assertTrue(np.array_equal(arrays["bilstm_l1.backward.lstm.weight_ih"],
                                       lstm.weight_ih_l1_reverse.detach().numpy()))
        self.assertEqual(arrays["bilstm_l1.forward.lstm.weight_ih"].shape, (24, 12))
        self.assertTrue(loaded.layers[0].bidirectional)
        self.assertEqual(loaded.layers[0].num_layers, 2)

    def test_bidirectional_wrapper_matches_pytorch(self):
        lstm = nn.LSTM(5, 6, bidirectional=True, batch_first=True)
        fwd = nn.LSTM(5, 6)
        bwd = nn.LSTM(5, 6, batch_first=True)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(fwd, name + "_l0").copy_(getattr(lstm, name + "_l0"))
                getattr(bwd, name + "_l0").copy_(getattr(lstm, name + "_l0_reverse"))
        x, lengths = rx.pad_batch(_vectors(5))
        with torch.no_grad():
            packed = pack_padded_sequence(x, lengths, batch_first=True,
                                          enforce_sorted=False)
            want, _ = pad_packed_sequence(lstm(packed)[0], batch_first=True)
            got = rx.Bidirectional(fwd, bwd)(x, lengths)
        for i, n in enumerate(LENGTHS):
            np.testing.assert_allclose(got[i, :n].numpy(), want[i, :n].numpy(),
                                       rtol=0, atol=1e-6)

    def test_bidirectional_wrapper_round_trip(self):
        for join in ("catenate", "total", "mean"):
            bi = rx.Bidirectional(nn.GRU(5, 6), nn.RNN(5, 6, num_layers=2), join=join)
            net = rx.SequenceNet([bi, nn.Linear(bi.output_size, 3)])
            loaded, text, arrays = self.round_trip(net, _vectors(5))
            self.assertIn('join: "%s"' % join, text)
            self.assertIn("backward_net {", text)
            self.assertIn("bidirectional.backward.rnn_l1.weight_hh", arrays)
            self.assertIsInstance(loaded.layers[0], rx.Bidirectional)
            self.assertEqual(loaded.layers[0].join, join)

    def test_map(self):
        lstm = nn.LSTM(5, 6, batch_first=True)
        body = rx.Map([nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3),
                       nn.Softmax(dim=-1)])
        net = rx.SequenceNet([lstm, body])
        loaded, text, arrays = self.round_trip(net, _vectors(5), labels=["x", "y", "z"])
        self.assertIn('type: "NetMapOperator"', text)
        self.assertIn("map.linear_2.bias", arrays)
        self.assertEqual(loaded.labels, ["x", "y", "z"])
        self.assertIsInstance(loaded.layers[1], rx.Map)

    def test_sequence_layers(self):
        seqs = _vectors(5, lengths=[3, 2, 5, 2])
        x, lengths = rx.pad_batch(seqs)
        with torch.no_grad():
            most, most_lengths = rx.SequenceMost()(x, lengths)
            rest, rest_lengths = rx.SequenceRest()(x, lengths)
            rev = rx.SequenceReverse()(x, lengths)
        for i, s in enumerate(seqs):
            n = len(s)
            self.assertEqual(int(most_lengths[i]), n - 1)
            self.assertEqual(int(rest_lengths[i]), n - 1)
            self.assertTrue(np.array_equal(most[i, :n - 1].numpy(), s[:-1]))
            self.assertTrue(np.array_equal(rest[i, :n - 1].numpy(), s[1:]))
            self.assertTrue(np.array_equal(rev[i, :n].numpy(), s[::-1]))
        net = rx.SequenceNet([rx.SequenceRest(), nn.GRU(5, 4, batch_first=True),
                              rx.SequenceMost(), rx.SequenceReverse()])
        seqs = _vectors(5, lengths=[3, 4, 5, 3])
        out = net.run(seqs)
        self.assertEqual([len(o) for o in out], [1, 2, 3, 1])
        self.round_trip(net, seqs)
        with self.assertRaises(ValueError):
            net.run(_vectors(5, lengths=[3, 1]))

    def test_unused_arrays_are_refused(self):
        net = rx.SequenceNet([nn.GRU(5, 4, batch_first=True)])
        version_dir = rx.export(net, self.tmp.name, "m")
        path = os.path.join(version_dir, "weights.safetensors")
        arrays = rx.read_safetensors(path)
        arrays["stray.weight"] = np.zeros(3, np.float32)
        rx.write_safetensors(path, arrays)
        with self.assertRaisesRegex(ValueError, "stray.weight"):
            rx.load(version_dir)

    def test_format_net(self):
        spec = {
            "name": "g",
            "inputs": [{"name": "input", "kind": "VECTOR_SEQUENCE", "width": 5},
                       {"name": "h0", "kind": "VECTOR", "width": 4}],
            "layers": [
                {"name": "fold", "type": "NetFoldListOperator",
                 "inputs": ["input", "h=h0"],
                 "net": {"inputs": [{"name": "x", "kind": "VECTOR", "width": 5},
                                    {"name": "h", "kind": "VECTOR", "width": 4}],
                         "layers": [{"name": "xh", "type": "CatenateLayer",
                                     "inputs": ["x", "h"]},
                                    {"name": "linear", "type": "LinearLayer",
                                     "size": 4}],
                         "outputs": [{"name": "h", "source": "linear"}]}},
                {"name": "drop", "type": "DropoutLayer", "probability": 0.25},
                {"name": "shape", "type": "ReshapeLayer", "dimensions": [2, 2]},
            ],
            "outputs": [{"name": "output", "source": "shape"},
                        {"name": "states", "source": "fold.h"}],
        }
        parsed = rx.parse_text_proto(rx.format_net(spec))
        fold = parsed["layers"][0]
        self.assertEqual(fold["inputs"], ["input", "h=h0"])
        self.assertEqual(fold["net"][0]["outputs"][0]["source"], ["linear"])
        self.assertEqual(parsed["layers"][1]["probability"], [0.25])
        self.assertEqual(parsed["layers"][2]["dimensions"], [2, 2])
        self.assertEqual(parsed["outputs"][1]["source"], ["fold.h"])
        with self.assertRaises(ValueError):
            rx.format_net({"layers": [{"name": "x", "type": "LinearLayer",
                                       "sise": 3}]})

    def test_refusals(self):
        with self.assertRaises(ValueError):
            rx.Map(nn.LSTM(4, 4))
        with self.assertRaises(ValueError):
            rx.Bidirectional(nn.LSTM(4, 4), nn.LSTM(4, 5))
        with self.assertRaises(ValueError):
            rx.Bidirectional(nn.LSTM(4, 4), nn.LSTM(4, 4), join="max")
        with self.assertRaises(ValueError):
            rx.SequenceNet([nn.LSTM(4, 4), rx.SequenceLast(), rx.Map(nn.Tanh())])
        with self.assertRaises(ValueError):
            rx.SequenceNet([nn.LSTM(4, 4), rx.SequenceLast(), rx.SequenceReverse()])
        with self.assertRaises(ValueError):
            rx.SequenceNet([nn.LSTM(4, 4, proj_size=2)])
        with self.assertRaises(ValueError):
            rx.SequenceNet([nn.LSTM(4, 6, bidirectional=True), nn.Linear(6, 2)])

    def test_refusals_name_the_module(self):
        cases = [
            ([nn.Linear(4, 4), nn.ELU(alpha=0.5)], "nn.ELU with alpha != 1"),
            ([nn.Linear(4, 4), nn.Softplus(beta=2.0)],
             "nn.Softplus with beta != 1"),
            ([nn.Linear(4, 4), nn.GELU(approximate="tanh")],
             "nn.GELU with approximate='tanh'"),
            ([nn.Linear(4, 4), nn.Softmax(dim=0)],
             "nn.Softmax must use dim=-1"),
            ([nn.Linear(4, 4), nn.Embedding(4, 4)],
             "nn.Embedding must be the first module, found at position 1"),
            ([nn.Embedding(4, 4, max_norm=1.0)], "nn.Embedding with max_norm"),
            ([type("MyLinear", (nn.Linear,), {})(4, 4)],
             "unsupported module at position 0"),
            ([nn.RNN(4, 4), nn.Linear(5, 2)],
             "nn.Linear at position 1 expects 5 inputs but receives 4"),
        ]
        for modules, message in cases:
            with self.subTest(message=message):
                with self.assertRaisesRegex(ValueError, re.escape(message)):
                    rx.SequenceNet(modules, input_width=4)

    def test_bad_labels_and_alphabets_are_refused(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        classifier = rx.SequenceNet([nn.Embedding(5, 4), nn.LSTM(4, 3),
                                     rx.SequenceLast(), nn.Linear(3, 2),
                                     nn.Softmax(dim=-1)])
        logits = rx.SequenceNet([nn.Linear(4, 2)], input_width=4)
        graph = rx.GraphNet(inputs=[("x", "vectors", 4)],
                            nodes=[("head", nn.Linear(4, 2), ["x"])],
                            outputs=[("y", "head")])
        cases = [
            (logits, dict(labels=["a", "b"]), "class labels need a net that "
             "ends in nn.Softmax"),
            (classifier, dict(labels=["a", "b", "c"]),
             "3 labels for an output of width 2"),
            (classifier, dict(labels=["a", "a"]), "the labels repeat a name"),
            (logits, dict(alphabet="ab"),
             "an alphabet needs a net that starts with nn.Embedding"),
            (classifier, dict(alphabet="aba"), "the alphabet repeats a character"),
            (classifier, dict(alphabet="abcdef"),
             "the alphabet needs 6 token ids but the embedding has vocab_size 5"),
            (classifier, dict(alphabet="aB", ignore_case=True),
             "ignore_case needs a lower-case alphabet"),
            (classifier, dict(output_name="input"),
             "the output cannot be named 'input'"),
            (graph, dict(labels=["a", "b"]),
             "labels and alphabets are not supported for a GraphNet"),
        ]
        for net, options, message in cases:
            with self.subTest(message=message):
                with self.assertRaisesRegex(ValueError, re.escape(message)):
                    rx.write_net(net, os.path.join(tmp.name, "v"), "m", **options)
        self.assertFalse(os.path.exists(os.path.join(tmp.name, "v")),
                         "a refused export wrote files")


def _pack_run(module, x, lengths):
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = pad_packed_sequence(module(packed)[0], batch_first=True,
                                 total_length=x.shape[1])
    return out


class Graphs(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.tmp = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.tmp.cleanup()

    def build(self):
        self.lstm = nn.LSTM(5, 6, num_layers=2, batch_first=True)
        self.side = nn.Linear(5, 6)
        self.head = nn.Linear(12, 3)
        self.bi = nn.GRU(6, 4, bidirectional=True, batch_first=True)
        return rx.GraphNet(
            inputs=[("x", "vectors", 5), ("extra", "vector", 6)],
            nodes=[("enc", self.lstm, ["x"]),
                   ("side", self.side, ["x"]),
                   ("act", nn.Tanh(), ["side"]),
                   ("cat", rx.Catenate(), ["enc", "act"]),
                   ("head", self.head, ["cat"]),
                   ("sum", rx.Total(), ["enc", "act", "enc"]),
                   ("prod", rx.Times(), ["sum", "act"]),
                   ("diff", rx.Subtract(), ["prod", "enc"]),
                   ("drop", nn.Dropout(0.5), ["diff"]),
                   ("shape", rx.Reshape(3, 2), ["drop"]),
                   ("bi", self.bi, ["shape"]),
                   ("last", rx.SequenceLast(), ["diff"]),
                   ("vsum", rx.Total(), ["last", "extra", "enc.state"])],
            outputs=[("y", "head"), ("z", "bi"), ("v", "vsum"), ("s", "enc.state")])

    def test_forward_matches_pytorch(self):
        net = self.build().eval()
        x, lengths = rx.pad_batch(_vectors(5))
        extra = torch.randn(len(LENGTHS), 6)
        with torch.no_grad():
            got = net({"x": x, "extra": extra}, lengths)
            again = net(x, extra, lengths)
            h = _pack_run(self.lstm, x, lengths)
            a = torch.tanh(self.side(x))
            y = self.head(torch.cat([h, a], dim=-1))
            d = (h + a + h) * a - h
            z = _pack_run(self.bi, d, lengths)
            index = torch.arange(len(LENGTHS))
            state = h[index, lengths - 1]
            v = d[index, lengths - 1] + extra + state
        for name, want in (("y", y), ("z", z)):
            for i, n in enumerate(LENGTHS):
                np.testing.assert_allclose(got[name][i, :n].numpy(), want[i, :n].numpy(),
                                           rtol=0, atol=1e-6)
                self.assertTrue(np.array_equal(got[name][i, :n].numpy(),
                                               again[name][i, :n].numpy()))
        np.testing.assert_allclose(got["v"].numpy(), v.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(got["s"].numpy(), state.numpy(), rtol=0, atol=1e-6)

    def test_export_wiring(self):
        net = self.build().eval()
        version_dir = rx.export(net, self.tmp.name, "g")
        with open(os.path.join(version_dir, "net.pbtxt")) as f:
            spec = rx.parse_text_proto(f.read())
        self.assertEqual([(i["name"][0], i["kind"][0]) for i in spec["inputs"]],
                         [("x", "VECTOR_SEQUENCE"), ("extra", "VECTOR")])
        layers = {layer["name"][0]: layer for layer in spec["layers"]}
        order = [layer["name"][0] for layer in spec["layers"]]
        self.assertEqual(order, ["enc_l0", "enc", "side", "act", "cat", "head", "sum",
                                 "prod", "diff", "drop", "shape", "bi", "last", "vsum"])
        self.assertEqual(layers["enc_l0"]["inputs"], ["x"])
        self.assertNotIn("inputs", layers["enc"])
        self.assertEqual(layers["cat"]["type"], ["CatenateLayer"])
        self.assertEqual(layers["cat"]["inputs"], ["enc", "act"])
        self.assertEqual(layers["sum"]["type"], ["TotalLayer"])
        self.assertEqual(layers["prod"]["type"], ["TimesLayer"])
        self.assertEqual(layers["diff"]["type"], ["SubtractLayer"])
        self.assertEqual(layers["diff"]["inputs"], ["prod", "enc"])
        self.assertEqual(layers["drop"]["type"], ["DropoutLayer"])
        self.assertEqual(layers["drop"]["probability"], [0.5])
        self.assertEqual(layers["shape"]["dimensions"], [3, 2])
        self.assertEqual(layers["bi"]["type"], ["NetBidirectionalOperator"])
        self.assertEqual(layers["bi"]["inputs"], ["shape"])
        self.assertEqual(layers["vsum"]["inputs"], ["last", "extra", "enc.state"])
        self.assertEqual([(o["name"][0], o["source"][0]) for o in spec["outputs"]],
                         [("y", "head"), ("z", "bi"), ("v", "vsum"), ("s", "enc.state")])
        arrays = rx.read_safetensors(os.path.join(version_dir, "weights.safetensors"))
        self.assertTrue(np.array_equal(arrays["enc_l0.weight_ih"],
                                       self.lstm.weight_ih_l0.detach().numpy()))
        self.assertTrue(np.array_equal(arrays["enc.weight_ih"],
                                       self.lstm.weight_ih_l1.detach().numpy()))
        self.assertTrue(np.array_equal(arrays["bi.backward.gru.weight_hh"],
                                       self.bi.weight_hh_l0_reverse.detach().numpy()))
        self.assertEqual(sorted(arrays), sorted(
            ["enc_l0.%s" % a for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            + ["enc.%s" % a for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            + ["side.weight", "side.bias", "head.weight", "head.bias"]
            + ["bi.%s.gru.%s" % (d, a) for d in ("forward", "backward")
               for a in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]))
        with self.assertRaises(NotImplementedError):
            rx.load(version_dir)

    def test_tokens_and_map(self):
        emb = nn.Embedding(9, 4)
        net = rx.GraphNet(
            inputs=[("ids", "tokens", 9)],
            nodes=[("emb", emb, ["ids"]),
                   ("map", rx.Map([nn.Linear(4, 4), nn.ReLU()]), ["emb"]),
                   ("both", rx.Catenate(), ["emb", "map"])],
            outputs=[("out", "both")]).eval()
        out = net.run({"ids": _tokens(9)})["out"]
        for seq, o in zip(_tokens(9), out):
            with torch.no_grad():
                e = emb(torch.as_tensor(seq))
                want = torch.cat([e, net.node_modules["map"](e)], dim=-1)
            np.testing.assert_allclose(o, want.numpy(), rtol=0, atol=1e-6)
        version_dir = rx.export(net, self.tmp.name, "t")
        with open(os.path.join(version_dir, "net.pbtxt")) as f:
            spec = rx.parse_text_proto(f.read())
        self.assertEqual(spec["inputs"][0]["vocab_size"], [9])
        self.assertEqual(spec["layers"][0]["inputs"], ["ids"])

    def test_glue_modules(self):
        a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
        self.assertTrue(torch.equal(rx.Catenate()(a, b), torch.cat([a, b], -1)))
        self.assertTrue(torch.equal(rx.Total()(a, b, a), a + b + a))
        self.assertTrue(torch.equal(rx.Times()(a, b), a * b))
        self.assertTrue(torch.equal(rx.Subtract()(a, b), a - b))
        self.assertTrue(torch.equal(rx.Reshape(2, 2)(a), a))
        with self.assertRaises(ValueError):
            rx.Total()(a, torch.randn(2, 3, 5))
        with self.assertRaises(ValueError):
            rx.Subtract()(a, b, a)
        with self.assertRaises(ValueError):
            rx.Reshape(3, 2)(a)

    def test_refusals_name_the_node(self):
        def graph(nodes, outputs=(("out", "last_node"),)):
            return rx.GraphNet([("x", "vectors", 5)], nodes, list(outputs))

        cases = [
            ([("a", nn.Linear(5, 3), ["x"]), ("b", nn.Linear(5, 4), ["x"]),
              ("last_node", rx.Total(), ["a", "b"])], "last_node"),
            ([("a", nn.Linear(5, 3), ["x"]), ("b", nn.Linear(5, 4), ["x"]),
              ("last_node", rx.Times(), ["a", "b"])], "last_node"),
            ([("a", nn.Linear(5, 3), ["x"]), ("b", nn.Linear(5, 4), ["x"]),
              ("last_node", rx.Subtract(), ["a", "b"])], "last_node"),
            ([("last_node", rx.Subtract(), ["x"])], "last_node"),
            ([("last_node", nn.Linear(4, 3), ["x"])], "last_node"),
            ([("last_node", rx.Reshape(2, 2), ["x"])], "last_node"),
            ([("most", rx.SequenceMost(), ["x"]),
              ("last_node", rx.Catenate(), ["x", "most"])], "last_node"),
            ([("last", rx.SequenceLast(), ["x"]),
              ("last_node", rx.Catenate(), ["x", "last"])], "last_node"),
            ([("last_node", nn.Linear(5, 3), ["nowhere"])], "last_node"),
            ([("last_node", nn.Embedding(5, 3), ["x"])], "last_node"),
            ([("last_node", nn.LSTM(5, 3, bidirectional=True), ["x"])],
             "last_node"),  # fine itself; the output port below is refused
        ]
        for nodes, name in cases[:-1]:
            with self.assertRaisesRegex(ValueError, name):
                graph(nodes)
        with self.assertRaisesRegex(ValueError, "state"):
            graph(cases[-1][0], [("out", "last_node.state")])
        with self.assertRaisesRegex(ValueError, "taken"):
            graph([("a", nn.LSTM(5, 3, num_layers=2), ["x"]),
                   ("a_l0", nn.Tanh(), ["x"]), ("last_node", nn.Tanh(), ["x"])])
        net = graph([("last_node", nn.Linear(5, 3), ["x"])])
        net.node_modules["last_node"] = nn.Linear(4, 3)
        with self.assertRaisesRegex(ValueError, "last_node"):
            rx.export(net, self.tmp.name, "bad")


if __name__ == "__main__":
    unittest.main()
