"""Export PyTorch sequence models to the rnnserve model format, and read them back.

A model version folder holds ``net.pbtxt`` (a text-format
``rnnserve.v1.NetSpec``) and ``weights.safetensors`` (the arrays, all F32,
little-endian); the model folder above it holds ``config.pbtxt`` (a
text-format ``rnnserve.v1.ModelConfig``)::

    <model_root>/<model_name>/config.pbtxt
    <model_root>/<model_name>/<version>/net.pbtxt
    <model_root>/<model_name>/<version>/weights.safetensors

The exporter handles chains of layers: a :class:`SequenceNet` built from the
modules below, each reading the output of the one before it. Operators
(:class:`Map`, :class:`Bidirectional`, bidirectional recurrent modules)
carry chains of their own as sub-nets. Arrays are named
``"<layer name>.<array>"``, and inside a sub-net
``"<operator name>.<sub-net layer name>.<array>"`` (``"<operator
name>.forward.<...>"`` and ``".backward.<...>"`` for the two copies of a
bidirectional operator); recurrent gate orders are PyTorch's.

==================================  ==========================  =====================================
PyTorch module                      net.pbtxt layer             arrays (shape)
==================================  ==========================  =====================================
nn.Embedding(V, E)                  EmbeddingLayer              weight [V, E]
                                    size: E, vocab_size: V
nn.Linear(I, O)                     LinearLayer                 weight [O, I], bias [O]
                                    size: O                     (bias zeros when the module has none)
nn.Tanh / Sigmoid / ReLU /          ElementwiseLayer            (none)
ELU() / Softplus() / GELU()         function: "tanh", "sigmoid",
                                    "relu", "elu", "softplus",
                                    "gelu"
nn.Softmax(dim=-1)                  SoftmaxLayer                (none)
nn.RNN(I, H, nonlinearity=...)      BasicRecurrentLayer         weight_ih [H, I], weight_hh [H, H],
                                    size: H, function: "tanh"   bias_ih [H], bias_hh [H]
                                    or "relu"
nn.GRU(I, H)                        GatedRecurrentLayer         weight_ih [3H, I], weight_hh [3H, H],
                                    size: H                     bias_ih [3H], bias_hh [3H]
                                                                (gates r, z, n)
nn.LSTM(I, H)                       LongShortTermMemoryLayer    weight_ih [4H, I], weight_hh [4H, H],
                                    size: H                     bias_ih [4H], bias_hh [4H]
                                                                (gates i, f, g, o)
  ... num_layers=L                  L recurrent layers, named   layer k from weight_ih_l<k>, ...
                                    "lstm", "lstm_l1", ...,
                                    "lstm_l<L-1>"
  ... bidirectional=True            per layer k a               <op>.forward.lstm.* from
                                    NetBidirectionalOperator    weight_ih_l<k>, ...;
                                    "bilstm" ("bilstm_l<k>"),   <op>.backward.lstm.* from
                                    join: "catenate", sub-net:  weight_ih_l<k>_reverse, ...
                                    input "input" -> one
                                    recurrent layer "lstm"
Bidirectional(fwd, bwd, join)       NetBidirectionalOperator    <op>.forward.<layer>.* from fwd,
                                    "bidirectional", join,      <op>.backward.<layer>.* from bwd
                                    net (fwd's layers),
                                    backward_net (bwd's)
Map(module or chain)                NetMapOperator "map",       map.<layer>.* as the chain's layers
                                    net: the chain's layers
SequenceLast()                      SequenceLastLayer "last"    (none)
SequenceMost()                      SequenceMostLayer "most"    (none)
SequenceRest()                      SequenceRestLayer "rest"    (none)
SequenceReverse()                   SequenceReverseLayer        (none)
                                    "reverse"
nn.Dropout, recurrent dropout       (omitted: identity at inference)
==================================  ==========================  =====================================

Layer names are the module kind (``embedding``, ``linear``, ``lstm``,
``gru``, ``rnn``, ``last``, ``softmax``, ``most``, ``rest``, ``reverse``,
``map``, ``bidirectional``, ``bilstm``, ``bigru``, ``birnn``, or the
function name of an elementwise layer), with ``_2``, ``_3``, ... added when a
kind repeats within one net or sub-net; layer k > 0 of a stacked recurrent
module adds ``_l<k>`` to the name of its layer 0 (``lstm_2_l1``: layer 1 of
the second LSTM module). Every sub-net has one input, ``"input"`` (a VECTOR
for Map, a VECTOR_SEQUENCE for the bidirectional copies), and outputs its
last layer.

Restrictions: no ``proj_size`` on nn.LSTM. ELU must have ``alpha=1``,
Softplus ``beta=1``, GELU ``approximate="none"``; nn.Embedding must not use
``max_norm`` and may only come first. After SequenceLast the data is one
vector per instance: only row-wise modules (Linear, elementwise, Softmax,
Dropout) may follow. Map holds row-wise modules only; Bidirectional takes
two unidirectional recurrent modules of equal input and hidden sizes.
SequenceMost and SequenceRest need sequences of at least 2 elements.
Anything else raises ``ValueError``.

The net has one input, ``"input"``: a ``TOKEN_SEQUENCE`` of ``vocab_size``
ids when the first layer is an embedding, otherwise a ``VECTOR_SEQUENCE`` of
``width`` floats. It has one output (``"output"`` unless renamed); with class
labels the output gets a class decoder, and the net must end in a softmax
(possibly the last module of a final Map, for per-element classes).

:class:`GraphNet` builds nets that are not chains: named inputs, nodes that
each apply one of the modules above to one source, or a glue module
(:class:`Catenate`, :class:`Total`, :class:`Times`, :class:`Subtract`) to
several, :class:`Reshape`, and named outputs. Its export writes one layer per
node named after it, wired with ``inputs``; a node that expands to L > 1
layers (stacked recurrent modules) writes ``"<node>_l0"`` ...
``"<node>_l<L-2>"`` and then ``"<node>"``. nn.Dropout nodes become
DropoutLayers. :func:`load` reads chains only and raises NotImplementedError
for such nets.

Entry points: :func:`export`, :func:`write_net`, :func:`load`,
:func:`read_safetensors`, :func:`write_safetensors`, :func:`pad_batch`,
:func:`encode_text`, :func:`reverse_padded`, :func:`format_net`.
"""

import json
import os
import re
import struct

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = [
    "SequenceLast",
    "SequenceMost",
    "SequenceRest",
    "SequenceReverse",
    "Map",
    "Bidirectional",
    "SequenceNet",
    "Catenate",
    "Total",
    "Times",
    "Subtract",
    "Reshape",
    "GraphNet",
    "export",
    "write_net",
    "load",
    "read_safetensors",
    "write_safetensors",
    "write_config",
    "format_net",
    "parse_text_proto",
    "pad_batch",
    "reverse_padded",
    "encode_text",
]


# --------------------------------------------------------------------------
# The PyTorch side
# --------------------------------------------------------------------------


def _as_lengths(lengths):
    if isinstance(lengths, torch.Tensor):
        return lengths.detach().to(device="cpu", dtype=torch.long)
    return torch.as_tensor(np.asarray(lengths, dtype=np.int64))


def reverse_padded(x, lengths):
    """Reverses each sequence of a padded batch-first batch ([B, T] or
    [B, T, D]) within its own length; positions past a sequence's length
    stay where they are."""
    lengths = _as_lengths(lengths).to(x.device)
    steps = x.shape[1]
    t = torch.arange(steps, device=x.device).unsqueeze(0)
    n = lengths.unsqueeze(1)
    index = torch.where(t < n, n - 1 - t, t)
    if x.dim() > 2:
        index = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(x.shape)
    return torch.gather(x, 1, index)


def _need_two(module, lengths):
    if lengths.numel() and int(lengths.min()) < 2:
        raise ValueError("%s needs sequences of at least 2 elements, got lengths %s"
                         % (type(module).__name__, lengths.tolist()))


class SequenceLast(nn.Module):
    """Takes the last element of each sequence (at index length - 1).

    Used inside :class:`SequenceNet`, which supplies the lengths; turns a
    padded [B, T, D] batch into [B, D].
    """

    def forward(self, x, lengths):
        index = lengths.to(device=x.device, dtype=torch.long) - 1
        return x[torch.arange(x.shape[0], device=x.device), index]


class SequenceMost(nn.Module):
    """Drops the last element of each sequence.

    ``forward(x, lengths)`` returns ``(x', lengths - 1)`` for a padded
    batch-first ``x``; every sequence needs at least 2 elements.
    """

    def forward(self, x, lengths):
        lengths = _as_lengths(lengths)
        _need_two(self, lengths)
        return x[:, :x.shape[1] - 1], lengths - 1


class SequenceRest(nn.Module):
    """Drops the first element of each sequence.

    ``forward(x, lengths)`` returns ``(x', lengths - 1)`` for a padded
    batch-first ``x``; every sequence needs at least 2 elements.
    """

    def forward(self, x, lengths):
        lengths = _as_lengths(lengths)
        _need_two(self, lengths)
        return x[:, 1:], lengths - 1


class SequenceReverse(nn.Module):
    """Reverses each sequence within its own length: ``forward(x, lengths)``
    returns the reversed padded batch (see :func:`reverse_padded`)."""

    def forward(self, x, lengths):
        return reverse_padded(x, lengths)


_ELEMENTWISE = {
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.ReLU: "relu",
    nn.ELU: "elu",
    nn.Softplus: "softplus",
    nn.GELU: "gelu",
}
_ELEMENTWISE_MODULES = {name: cls for cls, name in _ELEMENTWISE.items()}
_RECURRENT = (nn.RNN, nn.GRU, nn.LSTM)
_ROWWISE = frozenset((nn.Linear, nn.Softmax, nn.Dropout) + tuple(_ELEMENTWISE))
_JOINS = ("catenate", "total", "mean")


def _describe(module):
    return repr(module)


def _run_recurrent(module, x, lengths):
    """Runs an nn.RNN/GRU/LSTM on a padded batch-first batch, packed."""
    steps = x.shape[1]
    if not module.batch_first:
        x = x.transpose(0, 1)
    packed = pack_padded_sequence(x, _as_lengths(lengths),
                                  batch_first=module.batch_first,
                                  enforce_sorted=False)
    out, _ = module(packed)
    out, _ = pad_packed_sequence(out, batch_first=module.batch_first,
                                 total_length=steps)
    if not module.batch_first:
        out = out.transpose(0, 1)
    return out


class Map(nn.Module):
    """Applies a chain of row-wise modules (nn.Linear, elementwise functions,
    nn.Softmax, nn.Dropout) to every element of a sequence, with shared
    weights -- the rnnserve NetMapOperator.

    ``module`` is one such module, a list of them or an nn.Sequential; it is
    kept as the nn.Sequential ``self.net``. ``forward(x)`` applies it to a
    padded [B, T, D] batch.
    """

    def __init__(self, module):
        super().__init__()
        if isinstance(module, (list, tuple)):
            module = nn.Sequential(*module)
        elif type(module) is not nn.Sequential:
            module = nn.Sequential(module)
        if len(module) == 0:
            raise ValueError("Map needs at least one module")
        self.net = module
        _check_rowwise_chain(list(module), None, "Map")

    def forward(self, x):
        return self.net(x)


class Bidirectional(nn.Module):
    """Runs ``forward_rnn`` over each sequence and ``backward_rnn`` over each
    sequence reversed within its own length, re-reverses the latter's
    outputs so that element t lines up with element t, and joins the two:
    ``"catenate"`` (forward then backward), ``"total"`` or ``"mean"`` -- the
    rnnserve NetBidirectionalOperator with a backward net of its own.

    Both modules are unidirectional nn.RNN, nn.GRU or nn.LSTM (any number of
    layers, either ``batch_first``) with the same input and hidden sizes.
    ``forward(x, lengths)`` takes a padded batch-first batch; both
    directions run packed, so padding never affects a result.
    """

    def __init__(self, forward_rnn, backward_rnn, join="catenate"):
        super().__init__()
        if join not in _JOINS:
            raise ValueError("Bidirectional join must be one of %s, got %r"
                             % (", ".join(_JOINS), join))
        for which, module in (("forward", forward_rnn), ("backward", backward_rnn)):
            if type(module) not in _RECURRENT:
                raise ValueError("Bidirectional %s module must be an nn.RNN, nn.GRU "
                                 "or nn.LSTM: %s" % (which, _describe(module)))
            if module.bidirectional:
                raise ValueError("Bidirectional %s module must be unidirectional: %s"
                                 % (which, _describe(module)))
        if (forward_rnn.input_size != backward_rnn.input_size
                or forward_rnn.hidden_size != backward_rnn.hidden_size):
            raise ValueError("Bidirectional needs modules of equal input and hidden "
                             "sizes: %s and %s"
                             % (_describe(forward_rnn), _describe(backward_rnn)))
        self.forward_rnn = forward_rnn
        self.backward_rnn = backward_rnn
        self.join = join

    @property
    def input_size(self):
        return self.forward_rnn.input_size

    @property
    def output_size(self):
        hidden = self.forward_rnn.hidden_size
        return 2 * hidden if self.join == "catenate" else hidden

    def forward(self, x, lengths):
        lengths = _as_lengths(lengths)
        f = _run_recurrent(self.forward_rnn, x, lengths)
        b = _run_recurrent(self.backward_rnn, reverse_padded(x, lengths), lengths)
        b = reverse_padded(b, lengths)
        if self.join == "catenate":
            return torch.cat([f, b], dim=-1)
        if self.join == "total":
            return f + b
        return (f + b) * 0.5

    def extra_repr(self):
        return "join=%r" % (self.join,)


_SUPPORTED = frozenset(
    (nn.Embedding, SequenceLast, SequenceMost, SequenceRest, SequenceReverse,
     Map, Bidirectional) + _RECURRENT + tuple(_ROWWISE))


def _check_rowwise(module, width, where):
    """Validates a row-wise module; returns the width after it."""
    if type(module) not in _ROWWISE:
        raise ValueError("unsupported module %s: %s" % (where, _describe(module)))
    if isinstance(module, nn.Dropout):
        return width
    if isinstance(module, nn.Linear):
        if width is not None and width != module.in_features:
            raise ValueError("nn.Linear %s expects %d inputs but receives %d"
                             % (where, module.in_features, width))
        return module.out_features
    if isinstance(module, nn.Softmax):
        if module.dim != -1:
            raise ValueError("unsupported module: nn.Softmax must use dim=-1, "
                             "got %s" % _describe(module))
        return width
    if isinstance(module, nn.ELU) and float(module.alpha) != 1.0:
        raise ValueError("unsupported module: nn.ELU with alpha != 1: %s"
                         % _describe(module))
    if isinstance(module, nn.Softplus) and float(module.beta) != 1.0:
        raise ValueError("unsupported module: nn.Softplus with beta != 1: %s"
                         % _describe(module))
    if isinstance(module, nn.GELU) and getattr(module, "approximate", "none") != "none":
        raise ValueError("unsupported module: nn.GELU with approximate=%r "
                         "(only the exact erf form): %s"
                         % (module.approximate, _describe(module)))
    return width


def _check_rowwise_chain(modules, width, where):
    if not any(not isinstance(m, nn.Dropout) for m in modules):
        raise ValueError("%s needs a module besides dropout" % where)
    for i, module in enumerate(modules):
        width = _check_rowwise(module, width, "at position %d of %s" % (i, where))
    return width


def _check_recurrent(module, width, where):
    """Validates an nn.RNN/GRU/LSTM; returns the width of its output."""
    if getattr(module, "proj_size", 0):
        raise ValueError("unsupported module: nn.LSTM with proj_size: %s"
                         % _describe(module))
    if isinstance(module, nn.RNN) and module.nonlinearity not in ("tanh", "relu"):
        raise ValueError("unsupported module: nn.RNN with nonlinearity %r: %s"
                         % (module.nonlinearity, _describe(module)))
    if width is not None and width != module.input_size:
        raise ValueError("%s %s expects %d inputs but receives %d"
                         % (type(module).__name__, where, module.input_size, width))
    return module.hidden_size * (2 if module.bidirectional else 1)


def _check_module(module, position, sequence, width):
    """Validates one module of a top-level chain.

    ``sequence`` tells whether a sequence flows in (False after
    SequenceLast); ``width`` is the feature width flowing in (None when not
    known). Returns (width, sequence) after the module.
    """
    # Exact types only: a subclass may compute something else.
    if type(module) not in _SUPPORTED:
        raise ValueError("unsupported module at position %d: %s"
                         % (position, _describe(module)))
    where = "at position %d" % position
    if isinstance(module, nn.Embedding):
        if position != 0:
            raise ValueError("nn.Embedding must be the first module, found at "
                             "position %d: %s" % (position, _describe(module)))
        if module.max_norm is not None:
            raise ValueError("unsupported module: nn.Embedding with max_norm "
                             "(renormalises at inference): %s" % _describe(module))
        return module.embedding_dim, sequence
    if type(module) in _ROWWISE:
        return _check_rowwise(module, width, where), sequence
    if not sequence:
        what = ("another SequenceLast" if isinstance(module, SequenceLast)
                else "SequenceLast")
        raise ValueError("%s at position %d follows %s (it needs a sequence)"
                         % (type(module).__name__, position, what))
    if isinstance(module, SequenceLast):
        return width, False
    if isinstance(module, (SequenceMost, SequenceRest, SequenceReverse)):
        return width, True
    if isinstance(module, Map):
        return _check_rowwise_chain(list(module.net), width,
                                    "the Map at position %d" % position), True
    if isinstance(module, Bidirectional):
        for inner in (module.forward_rnn, module.backward_rnn):
            if type(inner) not in _RECURRENT or inner.bidirectional:
                raise ValueError("the Bidirectional at position %d needs two "
                                 "unidirectional recurrent modules: %s"
                                 % (position, _describe(inner)))
            _check_recurrent(inner, width, where + " (in Bidirectional)")
        if (module.forward_rnn.hidden_size != module.backward_rnn.hidden_size
                or module.forward_rnn.input_size != module.backward_rnn.input_size):
            raise ValueError("the Bidirectional at position %d has modules of "
                             "different sizes" % position)
        if module.join not in _JOINS:
            raise ValueError("the Bidirectional at position %d has join %r"
                             % (position, module.join))
        return module.output_size, True
    return _check_recurrent(module, width, where), True


def _check_chain(modules, input_width):
    """Validates a top-level chain; returns (output width, ends in sequence)."""
    width, sequence = input_width, True
    for i, module in enumerate(modules):
        width, sequence = _check_module(module, i, sequence, width)
    return width, sequence


def _first_width(modules):
    """The input width a chain implies, or None when nothing fixes it."""
    for module in modules:
        if isinstance(module, nn.Linear):
            return module.in_features
        if isinstance(module, _RECURRENT):
            return module.input_size
        if isinstance(module, Bidirectional):
            return module.input_size
        if isinstance(module, Map):
            width = _first_width(list(module.net))
            if width is not None:
                return width
    return None


def _apply_module(module, x, lengths):
    """Runs one supported module on a padded batch-first batch; returns
    (output, lengths of the output's sequences)."""
    if isinstance(module, SequenceLast):
        return module(x, lengths), lengths
    if isinstance(module, (SequenceMost, SequenceRest)):
        return module(x, lengths)
    if isinstance(module, (SequenceReverse, Bidirectional)):
        return module(x, lengths), lengths
    if isinstance(module, _RECURRENT):
        return _run_recurrent(module, x, lengths), lengths
    return module(x), lengths


class SequenceNet(nn.Module):
    """A chain of sequence layers run the way rnnserve runs them.

    ``modules`` is a list (or nn.Sequential) of supported modules, see the
    module docstring. ``input_width`` gives the input vector width when the
    first module does not fix it (for example a net that starts with an
    elementwise function); it is inferred otherwise.

    ``forward(x, lengths)`` takes a padded batch-first batch -- a LongTensor
    [B, T] of token ids or a FloatTensor [B, T, D] of vectors -- and the
    lengths of its sequences (each in 1..T). Recurrent layers run on packed
    sequences, so padding never influences a result. Returns a padded
    [B, T', D] tensor (positions past a sequence's length are unspecified),
    or [B, D] once a SequenceLast has run. SequenceMost and SequenceRest
    shorten every sequence by one; :meth:`forward_with_lengths` also returns
    the lengths of the result.

    Attributes kept for export and filled by :func:`load`: ``alphabet``,
    ``labels``, ``output_name`` and ``name`` (None when unset).
    """

    def __init__(self, modules, input_width=None):
        super().__init__()
        modules = list(modules)
        if not modules:
            raise ValueError("a SequenceNet needs at least one module")
        _check_chain(modules, input_width)
        self.layers = nn.ModuleList(modules)
        self.input_width = input_width
        self.alphabet = None
        self.labels = None
        self.output_name = None
        self.name = None

    @property
    def takes_tokens(self):
        return isinstance(self.layers[0], nn.Embedding)

    def input_spec(self):
        """Returns ("tokens", vocab_size) or ("vectors", width) for the input."""
        first = self.layers[0]
        if isinstance(first, nn.Embedding):
            return "tokens", first.num_embeddings
        if self.input_width is not None:
            return "vectors", int(self.input_width)
        width = _first_width(list(self.layers))
        if width is None:
            raise ValueError("cannot infer the input width of this net; pass "
                             "input_width to SequenceNet")
        return "vectors", int(width)

    def output_width(self):
        """The feature width of the net's output."""
        width = None if self.takes_tokens else self.input_spec()[1]
        return _check_chain(list(self.layers), width)[0]

    @property
    def ends_with_sequence(self):
        return not any(isinstance(m, SequenceLast) for m in self.layers)

    def forward(self, x, lengths):
        return self.forward_with_lengths(x, lengths)[0]

    def forward_with_lengths(self, x, lengths):
        """Like forward; returns (output, lengths of the output's sequences)."""
        lengths = _as_lengths(lengths)
        if x.dim() < 2:
            raise ValueError("expected a batch-first padded batch, got shape %s"
                             % (tuple(x.shape),))
        batch, steps = x.shape[0], x.shape[1]
        if lengths.shape != (batch,):
            raise ValueError("lengths must have shape [%d], got %s"
                             % (batch, tuple(lengths.shape)))
        if batch and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
            raise ValueError("lengths must lie in 1..%d, got %s"
                             % (steps, lengths.tolist()))
        for module in self.layers:
            x, lengths = _apply_module(module, x, lengths)
        return x, lengths

    @staticmethod
    def _run_recurrent(module, x, lengths):
        return _run_recurrent(module, x, lengths)

    def run(self, sequences):
        """Runs a list of sequences (lists of ids, or [T, D] arrays).

        Returns one numpy array per sequence: [T_i, D] for nets that end in a
        sequence (T_i its length after any SequenceMost or SequenceRest), [D]
        for nets that end after SequenceLast.
        """
        x, lengths = pad_batch(sequences, tokens=self.takes_tokens)
        with torch.no_grad():
            out, lengths = self.forward_with_lengths(x, lengths)
        out = out.cpu().numpy()
        if self.ends_with_sequence:
            return [out[i, :int(n)] for i, n in enumerate(lengths)]
        return [out[i] for i in range(len(sequences))]


# --------------------------------------------------------------------------
# Graphs: glue modules and GraphNet
# --------------------------------------------------------------------------


def _check_same_shapes(module, xs):
    if not xs:
        raise ValueError("%s needs at least one input" % type(module).__name__)
    for x in xs[1:]:
        if x.shape != xs[0].shape:
            raise ValueError("%s needs inputs of one shape, got %s"
                             % (type(module).__name__,
                                ", ".join(str(tuple(t.shape)) for t in xs)))


class Catenate(nn.Module):
    """Joins the rows of its inputs end to end (the rnnserve CatenateLayer):
    ``forward(*xs)`` on padded [B, T, D_i] (or [B, D_i]) tensors returns
    [B, T, sum(D_i)]."""

    def forward(self, *xs):
        if not xs:
            raise ValueError("Catenate needs at least one input")
        return torch.cat(xs, dim=-1)


class Total(nn.Module):
    """Element-wise sum of inputs of one width (the rnnserve TotalLayer)."""

    def forward(self, *xs):
        _check_same_shapes(self, xs)
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Times(nn.Module):
    """Element-wise product of inputs of one width (the rnnserve TimesLayer)."""

    def forward(self, *xs):
        _check_same_shapes(self, xs)
        out = xs[0]
        for x in xs[1:]:
            out = out * x
        return out


class Subtract(nn.Module):
    """The first of two inputs of one width minus the second (the rnnserve
    SubtractLayer)."""

    def forward(self, *xs):
        if len(xs) != 2:
            raise ValueError("Subtract needs two inputs, got %d" % len(xs))
        _check_same_shapes(self, xs)
        return xs[0] - xs[1]


class Reshape(nn.Module):
    """The rnnserve ReshapeLayer: rows read as ``dims``. Rows stay flat here,
    so ``forward(x)`` returns ``x`` after checking that a row holds
    ``prod(dims)`` elements."""

    def __init__(self, *dims):
        super().__init__()
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        if not dims or any(int(d) < 1 for d in dims):
            raise ValueError("Reshape needs positive dimensions, got %s" % (dims,))
        self.dims = tuple(int(d) for d in dims)

    @property
    def size(self):
        return int(np.prod(self.dims))

    def forward(self, x):
        if x.shape[-1] != self.size:
            raise ValueError("Reshape to %s needs rows of %d elements, got %d"
                             % (self.dims, self.size, x.shape[-1]))
        return x

    def extra_repr(self):
        return ", ".join(str(d) for d in self.dims)


_GLUE = {Catenate: "CatenateLayer", Total: "TotalLayer", Times: "TimesLayer",
         Subtract: "SubtractLayer"}
_GLUE_MODULES = {ltype: cls for cls, ltype in _GLUE.items()}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INPUT_KINDS = {"vectors": "VECTOR_SEQUENCE", "tokens": "TOKEN_SEQUENCE",
                "vector": "VECTOR"}


class _Value:
    """What flows out of a graph input or node: its width, and the lengths
    it shares (a tuple naming the input and any SequenceMost/Rest applied),
    or None for one vector per instance."""

    def __init__(self, width, origin, tokens=False):
        self.width = width
        self.origin = origin
        self.tokens = tokens


class GraphNet(nn.Module):
    """A graph of modules, run the way rnnserve runs it.

    ``inputs`` lists the net inputs as ``(name, kind, size)``: kind
    ``"vectors"`` (a sequence of ``size``-wide vectors), ``"tokens"`` (a
    sequence of ids below ``size``, read only by nn.Embedding nodes) or
    ``"vector"`` (one ``size``-wide vector per instance).

    ``nodes`` lists ``(name, module, [source, ...])`` in an order where every
    source comes before its reader. A source is an input name, a node name,
    or ``"node.state"`` (the final state of a unidirectional nn.RNN/GRU/LSTM
    node, a vector). A glue module (:class:`Catenate`, :class:`Total`,
    :class:`Times`, :class:`Subtract`) reads several sources, which must all
    be vectors or all sequences of the same lengths (read from one input
    through the same SequenceMost/SequenceRest steps). Any other node reads
    one source with one module that :class:`SequenceNet` supports, or a
    :class:`Reshape`.

    ``outputs`` lists ``(output name, source)``.

    ``forward(inputs, lengths)`` takes a dict of input name -> padded
    batch-first tensor (or the tensors in input order, positionally) and the
    lengths: a dict of input name -> lengths, or one lengths tensor shared by
    every sequence input. It returns a dict of output name -> padded tensor
    ([B, T, D] for sequences, [B, D] for vectors).
    :meth:`forward_with_lengths` returns output name -> (tensor, lengths or
    None); :meth:`run` takes lists of sequences.
    """

    def __init__(self, inputs, nodes, outputs):
        super().__init__()
        self.input_specs = []
        values = {}
        for spec in inputs:
            name, kind, size = spec
            if not _NAME.match(str(name)):
                raise ValueError("bad input name %r" % (name,))
            if kind not in _INPUT_KINDS:
                raise ValueError("input %r: kind must be one of %s, got %r"
                                 % (name, ", ".join(_INPUT_KINDS), kind))
            if name in values:
                raise ValueError("input %r appears twice" % name)
            values[name] = _Value(int(size), None if kind == "vector" else (name,),
                                  kind == "tokens")
            self.input_specs.append((name, kind, int(size)))
        if not self.input_specs:
            raise ValueError("a GraphNet needs at least one input")
        self.node_specs = []
        self.node_modules = nn.ModuleDict()
        layer_names = set(values)
        for spec in nodes:
            name, module, sources = spec
            if isinstance(sources, str):
                sources = [sources]
            sources = list(sources)
            if not _NAME.match(str(name)):
                raise ValueError("bad node name %r" % (name,))
            if name in values or name in layer_names:
                raise ValueError("node %r: the name is taken" % name)
            count = _node_layer_count(module)
            names = _node_layer_names(name, count)
            for layer_name in names:
                if layer_name in layer_names:
                    raise ValueError("node %r: layer name %r is taken"
                                     % (name, layer_name))
            ins = [self._source(values, s, name) for s in sources]
            values[name] = _check_node(name, module, ins)
            layer_names.update(names)
            self.node_specs.append((name, sources))
            self.node_modules[name] = module
        self.output_specs = []
        for out_name, source in outputs:
            if not out_name or not isinstance(out_name, str):
                raise ValueError("bad output name %r" % (out_name,))
            if out_name in [n for n, _, _ in self.input_specs]:
                raise ValueError("output %r has an input's name" % out_name)
            if out_name in [n for n, _ in self.output_specs]:
                raise ValueError("output %r appears twice" % out_name)
            self._source(values, source, "output %r" % out_name)
            self.output_specs.append((out_name, source))
        if not self.output_specs:
            raise ValueError("a GraphNet needs at least one output")
        self.name = None

    def _source(self, values, source, reader):
        """The _Value a source names (checked)."""
        node, _, port = str(source).partition(".")
        if node not in values:
            raise ValueError("%s reads %r, which is no input or earlier node"
                             % (_reader(reader), source))
        value = values[node]
        if not port or port == "output":
            return value
        module = self.node_modules[node] if node in self.node_modules else None
        if (port == "state" and type(module) in _RECURRENT
                and not module.bidirectional):
            return _Value(module.hidden_size, None)
        raise ValueError("%s reads %r: only the \"state\" port of a "
                         "unidirectional nn.RNN/GRU/LSTM node is supported"
                         % (_reader(reader), source))

    def input_widths(self):
        return {name: size for name, _, size in self.input_specs}

    def forward(self, *args, lengths=None):
        outs = self.forward_with_lengths(*args, lengths=lengths)
        return {name: value for name, (value, _) in outs.items()}

    def forward_with_lengths(self, *args, lengths=None):
        """Like forward; returns output name -> (tensor, lengths or None)."""
        names = [n for n, _, _ in self.input_specs]
        if args and isinstance(args[0], dict):
            xs = dict(args[0])
            rest = args[1:]
        else:
            xs = dict(zip(names, args))
            rest = args[len(names):]
        if rest:
            if lengths is not None or len(rest) > 1:
                raise ValueError("too many arguments")
            lengths = rest[0]
        missing = [n for n in names if n not in xs]
        if missing:
            raise ValueError("missing inputs: %s" % ", ".join(missing))
        env = {}
        for name, kind, size in self.input_specs:
            x = xs[name]
            if kind == "vector":
                env[name] = (x, None)
                continue
            n = lengths.get(name) if isinstance(lengths, dict) else lengths
            if n is None:
                raise ValueError("no lengths for input %r" % name)
            n = _as_lengths(n)
            if x.dim() < 2 or n.shape != (x.shape[0],):
                raise ValueError("input %r: expected a padded batch-first batch "
                                 "and [B] lengths, got %s and %s"
                                 % (name, tuple(x.shape), tuple(n.shape)))
            if x.shape[0] and (int(n.min()) < 1 or int(n.max()) > x.shape[1]):
                raise ValueError("input %r: lengths must lie in 1..%d, got %s"
                                 % (name, x.shape[1], n.tolist()))
            env[name] = (x, n)
        for name, sources in self.node_specs:
            module = self.node_modules[name]
            ins = [self._fetch(env, s) for s in sources]
            if type(module) in _GLUE:
                env[name] = (module(*[x for x, _ in ins]), ins[0][1])
            elif isinstance(module, Reshape):
                env[name] = (module(ins[0][0]), ins[0][1])
            elif isinstance(module, SequenceLast):
                env[name] = (module(ins[0][0], ins[0][1]), None)
            else:
                env[name] = _apply_module(module, ins[0][0], ins[0][1])
        return {out: self._fetch(env, source) for out, source in self.output_specs}

    def _fetch(self, env, source):
        node, _, port = str(source).partition(".")
        x, n = env[node]
        if port == "state":
            return SequenceLast()(x, n), None
        return x, n

    def run(self, inputs):
        """Runs a dict of input name -> list of sequences (lists of ids or
        [T, D] arrays; [D] vectors for a "vector" input). Returns output name
        -> list of [T_i, D] arrays for sequences, a [B, D] array for vectors."""
        xs, lengths = {}, {}
        for name, kind, _ in self.input_specs:
            if kind == "vector":
                xs[name] = torch.as_tensor(np.asarray(inputs[name], dtype=np.float32))
            else:
                xs[name], lengths[name] = pad_batch(inputs[name],
                                                    tokens=kind == "tokens")
        with torch.no_grad():
            outs = self.forward_with_lengths(xs, lengths=lengths)
        result = {}
        for name, (x, n) in outs.items():
            x = x.cpu().numpy()
            result[name] = x if n is None else [x[i, :int(k)] for i, k in enumerate(n)]
        return result


def _reader(reader):
    return reader if reader.startswith("output") else "node %r" % reader


def _node_layer_count(module):
    if isinstance(module, _RECURRENT):
        return module.num_layers
    return 1


def _node_layer_names(name, count):
    """The engine layers of a node: "<node>_l0", ..., "<node>_l<L-2>" and
    then "<node>" for the last."""
    return ["%s_l%d" % (name, k) for k in range(count - 1)] + [name]


def _check_node(name, module, ins):
    """Validates one graph node; returns the _Value it produces."""
    where = "node %r" % name
    if type(module) in _GLUE:
        if not ins:
            raise ValueError("%s: %s needs at least one source"
                             % (where, type(module).__name__))
        if isinstance(module, Subtract) and len(ins) != 2:
            raise ValueError("%s: Subtract needs two sources, got %d"
                             % (where, len(ins)))
        for value in ins:
            if value.tokens:
                raise ValueError("%s: token ids can only go into nn.Embedding" % where)
        origins = set(value.origin for value in ins)
        if len(origins) > 1:
            raise ValueError("%s: %s needs all vectors or sequences of the same "
                             "lengths, got %s" % (where, type(module).__name__,
                                                  sorted(map(str, origins))))
        widths = [value.width for value in ins]
        if isinstance(module, Catenate):
            return _Value(sum(widths), ins[0].origin)
        if len(set(widths)) > 1:
            raise ValueError("%s: %s needs sources of one width, got %s"
                             % (where, type(module).__name__,
                                ", ".join(map(str, widths))))
        return _Value(widths[0], ins[0].origin)
    if len(ins) != 1:
        raise ValueError("%s: %s reads one source, got %d"
                         % (where, type(module).__name__, len(ins)))
    value = ins[0]
    if isinstance(module, Reshape):
        if value.tokens:
            raise ValueError("%s: token ids can only go into nn.Embedding" % where)
        if value.width != module.size:
            raise ValueError("%s: Reshape to %s needs rows of %d elements, got %d"
                             % (where, module.dims, module.size, value.width))
        return _Value(value.width, value.origin)
    if isinstance(module, nn.Embedding) != value.tokens:
        raise ValueError("%s: nn.Embedding reads a tokens input, and only it "
                         "does: %s" % (where, _describe(module)))
    if isinstance(module, nn.Embedding) and module.num_embeddings != value.width:
        raise ValueError("%s: nn.Embedding has %d ids, the input has %d"
                         % (where, module.num_embeddings, value.width))
    try:
        width, sequence = _check_module(module, 0, value.origin is not None,
                                        None if value.tokens else value.width)
    except ValueError as e:
        raise ValueError("%s: %s" % (where, e))
    if not sequence:
        origin = None
    elif isinstance(module, (SequenceMost, SequenceRest)):
        origin = value.origin + (_KIND_NAMES[type(module)],)
    else:
        origin = value.origin
    return _Value(width, origin)


def pad_batch(sequences, tokens=None):
    """Pads a list of sequences into a batch-first tensor.

    Token sequences (lists or 1-D integer arrays) become a LongTensor [B, T]
    padded with 0; vector sequences ([T_i, D] arrays) a float32 FloatTensor
    [B, T, D] padded with 0. Returns (batch, lengths LongTensor [B]).
    """
    arrays = [np.asarray(s) for s in sequences]
    if not arrays:
        raise ValueError("empty batch")
    if tokens is None:
        tokens = arrays[0].ndim == 1
    lengths = [len(a) for a in arrays]
    steps = max(lengths)
    if tokens:
        batch = np.zeros((len(arrays), steps), dtype=np.int64)
        for i, a in enumerate(arrays):
            batch[i, :len(a)] = a
    else:
        width = arrays[0].shape[1]
        batch = np.zeros((len(arrays), steps, width), dtype=np.float32)
        for i, a in enumerate(arrays):
            batch[i, :len(a)] = a
    return torch.from_numpy(batch), torch.tensor(lengths, dtype=torch.long)


def encode_text(text, alphabet, ignore_case=False, unknown_token=False):
    """Maps each character of ``text`` to its index in ``alphabet``, as the
    characters encoder does."""
    index = {c: i for i, c in enumerate(alphabet)}
    ids = []
    for c in text:
        if ignore_case:
            c = c.lower()
        if c in index:
            ids.append(index[c])
        elif unknown_token:
            ids.append(len(alphabet))
        else:
            raise ValueError("character %r is not in the alphabet" % c)
    return ids


# --------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------

_DTYPE_NAMES = {
    np.dtype("<f4"): "F32",
    np.dtype("<f8"): "F64",
    np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64",
    np.dtype("<i4"): "I32",
    np.dtype("<i2"): "I16",
    np.dtype("i1"): "I8",
    np.dtype("u1"): "U8",
    np.dtype("<u2"): "U16",
    np.dtype("<u4"): "U32",
    np.dtype("<u8"): "U64",
    np.dtype("bool"): "BOOL",
}
_NAME_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def write_safetensors(path, arrays, metadata=None):
    """Writes a dict of name -> numpy array (or tensor) as a safetensors file.

    Arrays are stored little-endian, in the dict's order; the JSON header is
    padded with spaces so the data starts at a multiple of 8 bytes.
    ``metadata`` (a dict of str -> str) goes into ``"__metadata__"``.
    """
    header = {}
    blobs = []
    offset = 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, array in arrays.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved")
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        array = np.asarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _DTYPE_NAMES:
            raise ValueError("array %r has unsupported dtype %s" % (name, array.dtype))
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": [int(d) for d in array.shape],
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in blobs:
            f.write(data)
    os.replace(tmp, path)


def read_safetensors(path, with_metadata=False):
    """Reads a safetensors file into a dict of name -> numpy array.

    With ``with_metadata=True`` returns (arrays, metadata dict).
    """
    with open(path, "rb") as f:
        content = f.read()
    if len(content) < 8:
        raise ValueError("%s: too short for a safetensors file" % path)
    (size,) = struct.unpack("<Q", content[:8])
    if 8 + size > len(content):
        raise ValueError("%s: header length %d runs past the end of the file"
                         % (path, size))
    header = json.loads(content[8:8 + size].decode("utf-8"))
    data = memoryview(content)[8 + size:]
    metadata = header.pop("__metadata__", None) or {}
    arrays = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        dtype_name = info["dtype"]
        if dtype_name == "BF16":
            raw = np.frombuffer(data[begin:end], dtype="<u2").astype(np.uint32)
            array = (raw << 16).view(np.float32)
        elif dtype_name in _NAME_DTYPES:
            array = np.frombuffer(data[begin:end], dtype=_NAME_DTYPES[dtype_name])
        else:
            raise ValueError("%s: array %r has unsupported dtype %s"
                             % (path, name, dtype_name))
        count = int(np.prod(shape)) if shape else 1
        if array.size != count:
            raise ValueError("%s: array %r holds %d elements, shape %s needs %d"
                             % (path, name, array.size, shape, count))
        arrays[name] = array.reshape(shape).copy()
    return (arrays, metadata) if with_metadata else arrays


# --------------------------------------------------------------------------
# Text-format protobuf: writing
# --------------------------------------------------------------------------

_SIMPLE_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"',
                   "'": "\\'", "\\": "\\\\"}


def quote(text):
    """Quotes a string for protobuf text format (C-style escapes).

    Printable characters are written as they are (UTF-8); quotes, backslashes
    and control characters are escaped, other non-printable characters are
    written as octal escapes of their UTF-8 bytes.
    """
    out = ['"']
    for c in text:
        if c in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[c])
        elif c.isprintable() and not ("\ud800" <= c <= "\udfff"):
            out.append(c)
        else:
            try:
                raw = c.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("string %r is not valid Unicode" % text)
            out.append("".join("\\%03o" % b for b in raw))
    out.append('"')
    return "".join(out)


class _Writer:
    def __init__(self):
        self.lines = []
        self.depth = 0

    def field(self, name, value):
        if isinstance(value, _Enum):
            text = str(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, str):
            text = quote(value)
        else:
            raise TypeError("cannot write %r" % (value,))
        self.lines.append("  " * self.depth + "%s: %s" % (name, text))

    def open(self, name):
        self.lines.append("  " * self.depth + name + " {")
        self.depth += 1

    def close(self):
        self.depth -= 1
        self.lines.append("  " * self.depth + "}")

    def text(self):
        return "\n".join(self.lines) + "\n"


class _Enum(str):
    """An enum value (an identifier) in text format."""


# --------------------------------------------------------------------------
# Text-format protobuf: reading
# --------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)[fF]?)
  | (?P<ident>-?[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[{}<>:,;\[\]])
""", re.VERBOSE)

_UNESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11,
              "\\": 92, "'": 39, '"': 34, "?": 63}


def _unquote(literal):
    body = literal[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        i += 1
        if i >= len(body):
            raise ValueError("bad escape at the end of %s" % literal)
        c = body[i]
        if c in _UNESCAPES:
            out.append(_UNESCAPES[c])
            i += 1
        elif c in "01234567":
            j = i
            while j < len(body) and j < i + 3 and body[j] in "01234567":
                j += 1
            out.append(int(body[i:j], 8) & 0xFF)
            i = j
        elif c in "xX":
            j = i + 1
            while j < len(body) and j < i + 3 and body[j] in "0123456789abcdefABCDEF":
                j += 1
            if j == i + 1:
                raise ValueError("bad \\x escape in %s" % literal)
            out.append(int(body[i + 1:j], 16))
            i = j
        elif c in "uU":
            digits = 4 if c == "u" else 8
            code = body[i + 1:i + 1 + digits]
            if len(code) != digits or not all(ch in "0123456789abcdefABCDEF" for ch in code):
                raise ValueError("bad \\%s escape in %s" % (c, literal))
            out += chr(int(code, 16)).encode("utf-8", "surrogatepass")
            i += 1 + digits
        else:
            raise ValueError("unknown escape \\%s in %s" % (c, literal))
    return out.decode("utf-8")


def _tokenize(text):
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            line = text.count("\n", 0, pos) + 1
            raise ValueError("text format: unexpected %r on line %d"
                             % (text[pos:pos + 10], line))
        pos = m.end()
        kind = m.lastgroup
        if kind != "space":
            tokens.append((kind, m.group()))
    return tokens


def parse_text_proto(text):
    """Parses protobuf text format into nested dicts.

    Each message becomes a dict of field name -> list of values; a value is a
    str (string field), int or float (number), an enum/bool identifier (a str
    subclass, compare with ==), or a nested dict. Adjacent string literals are
    joined, as protobuf does.
    """
    tokens = _tokenize(text)
    pos = [0]

    def peek():
        return tokens[pos[0]] if pos[0] < len(tokens) else (None, None)

    def take():
        tok = peek()
        pos[0] += 1
        return tok

    def scalar():
        kind, value = take()
        if kind == "string":
            parts = [_unquote(value)]
            while peek()[0] == "string":
                parts.append(_unquote(take()[1]))
            return "".join(parts)
        if kind == "number":
            if re.fullmatch(r"[-+]?0[xX][0-9a-fA-F]+", value):
                return int(value, 16)
            v = value.rstrip("fF")
            if re.fullmatch(r"[-+]?[0-9]+", v):
                return int(v)
            return float(v)
        if kind == "ident":
            low = value.lower()
            if low in ("inf", "infinity", "-inf", "-infinity", "nan", "-nan"):
                return float(value)
            return _Enum(value)
        raise ValueError("text format: expected a value, got %r" % (value,))

    def message(closing):
        fields = {}
        while True:
            kind, value = peek()
            if kind is None:
                if closing is not None:
                    raise ValueError("text format: missing %r" % closing)
                return fields
            if kind == "punct" and value == closing:
                take()
                return fields
            if kind != "ident":
                raise ValueError("text format: expected a field name, got %r" % (value,))
            take()
            name = value
            colon = peek() == ("punct", ":")
            if colon:
                take()
            kind, value = peek()
            if kind == "punct" and value in "{<":
                take()
                fields.setdefault(name, []).append(message("}" if value == "{" else ">"))
            elif kind == "punct" and value == "[":
                take()
                values = fields.setdefault(name, [])
                while peek() != ("punct", "]"):
                    if peek()[1] in ("{", "<"):
                        opener = take()[1]
                        values.append(message("}" if opener == "{" else ">"))
                    else:
                        values.append(scalar())
                    if peek() == ("punct", ","):
                        take()
                take()
            else:
                if not colon:
                    raise ValueError("text format: expected ':' after %r" % name)
                fields.setdefault(name, []).append(scalar())
            if peek() in (("punct", ","), ("punct", ";")):
                take()

    return message(None)


def _one(fields, name, default=None):
    values = fields.get(name, [])
    if len(values) > 1:
        raise ValueError("field %r is not repeated but appears %d times"
                         % (name, len(values)))
    return values[0] if values else default


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

_CONFIG_FIELDS = ("description", "max_sequence_length", "max_batch_size",
                  "device", "versions")

_KIND_NAMES = {
    nn.Embedding: "embedding",
    nn.Linear: "linear",
    nn.Softmax: "softmax",
    SequenceLast: "last",
    SequenceMost: "most",
    SequenceRest: "rest",
    SequenceReverse: "reverse",
    Map: "map",
    Bidirectional: "bidirectional",
    nn.LSTM: "lstm",
    nn.GRU: "gru",
    nn.RNN: "rnn",
}

# Recurrent module -> (layer type, gate count).
_RECURRENT_LAYERS = {
    nn.RNN: ("BasicRecurrentLayer", 1),
    nn.GRU: ("GatedRecurrentLayer", 3),
    nn.LSTM: ("LongShortTermMemoryLayer", 4),
}
_RECURRENT_MODULES = {ltype: cls for cls, (ltype, _) in _RECURRENT_LAYERS.items()}

_SEQUENCE_LAYERS = {
    SequenceLast: "SequenceLastLayer",
    SequenceMost: "SequenceMostLayer",
    SequenceRest: "SequenceRestLayer",
    SequenceReverse: "SequenceReverseLayer",
}
_SEQUENCE_MODULES = {ltype: cls for cls, ltype in _SEQUENCE_LAYERS.items()}

# LayerSpec fields in the order net.proto declares them.
_LAYER_FIELDS = ("name", "type", "inputs", "size", "vocab_size", "function",
                 "reset_before", "net", "backward_net", "join", "iterations",
                 "score", "dimensions", "probability")


def _layer_base_name(module):
    kind = _KIND_NAMES.get(type(module))
    if kind is None:
        return _ELEMENTWISE[type(module)]
    if isinstance(module, _RECURRENT) and module.bidirectional:
        return "bi" + kind
    return kind


def _take_name(used, base):
    used[base] = used.get(base, 0) + 1
    return base if used[base] == 1 else "%s_%d" % (base, used[base])


def _f32(tensor):
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype="<f4")


def _subnet(kind, width, layers):
    """A sub-net spec with one input, "input", that outputs its last layer."""
    return {"inputs": [{"name": "input", "kind": kind, "width": int(width)}],
            "layers": layers}


def _recurrent_layer(module, k, direction, name, prefix, arrays):
    """Layer k of a recurrent module (direction "" or "_reverse") as a layer
    named ``name``; adds its arrays, named with ``prefix``."""
    ltype, gates = _RECURRENT_LAYERS[type(module)]
    hidden = module.hidden_size
    layer = {"name": name, "type": ltype, "size": hidden}
    if isinstance(module, nn.RNN):
        layer["function"] = module.nonlinearity
    suffix = "_l%d%s" % (k, direction)
    arrays[prefix + name + ".weight_ih"] = _f32(getattr(module, "weight_ih" + suffix))
    arrays[prefix + name + ".weight_hh"] = _f32(getattr(module, "weight_hh" + suffix))
    for bias in ("bias_ih", "bias_hh"):
        param = getattr(module, bias + suffix, None) if module.bias else None
        arrays[prefix + name + "." + bias] = (
            _f32(param) if param is not None else np.zeros(gates * hidden, "<f4"))
    return layer


def _recurrent_layers(module, base, prefix, arrays, width):
    """The layers of an nn.RNN/GRU/LSTM: one per layer of the module, each a
    NetBidirectionalOperator when the module is bidirectional."""
    layers = []
    kind = _KIND_NAMES[type(module)]
    for k in range(module.num_layers):
        name = base if k == 0 else "%s_l%d" % (base, k)
        if not module.bidirectional:
            layers.append(_recurrent_layer(module, k, "", name, prefix, arrays))
            width = module.hidden_size
            continue
        forward = _recurrent_layer(module, k, "", kind,
                                   prefix + name + ".forward.", arrays)
        _recurrent_layer(module, k, "_reverse", kind,
                         prefix + name + ".backward.", arrays)
        layers.append({"name": name, "type": "NetBidirectionalOperator",
                       "net": _subnet("VECTOR_SEQUENCE", width, [forward]),
                       "join": "catenate"})
        width = 2 * module.hidden_size
    return layers, width


def _chain_layers(modules, prefix, arrays, width):
    """Layer specs for a validated chain of modules whose input is ``width``
    wide (None for token ids). Adds the arrays, named with ``prefix``;
    returns (layers, output width)."""
    layers = []
    used = {}
    for module in modules:
        if isinstance(module, nn.Dropout):
            continue
        if type(module) not in _SUPPORTED:
            raise ValueError("unsupported module: %s" % _describe(module))
        name = _take_name(used, _layer_base_name(module))
        layer = {"name": name}
        if isinstance(module, nn.Embedding):
            layer.update(type="EmbeddingLayer", size=module.embedding_dim,
                         vocab_size=module.num_embeddings)
            arrays[prefix + name + ".weight"] = _f32(module.weight)
            width = module.embedding_dim
        elif isinstance(module, nn.Linear):
            layer.update(type="LinearLayer", size=module.out_features)
            arrays[prefix + name + ".weight"] = _f32(module.weight)
            arrays[prefix + name + ".bias"] = (
                _f32(module.bias) if module.bias is not None
                else np.zeros(module.out_features, "<f4"))
            width = module.out_features
        elif isinstance(module, nn.Softmax):
            layer.update(type="SoftmaxLayer")
        elif type(module) in _SEQUENCE_LAYERS:
            layer.update(type=_SEQUENCE_LAYERS[type(module)])
        elif isinstance(module, _RECURRENT):
            more, width = _recurrent_layers(module, name, prefix, arrays, width)
            layers.extend(more)
            continue
        elif isinstance(module, Map):
            inner, out_width = _chain_layers(list(module.net), prefix + name + ".",
                                             arrays, width)
            layer.update(type="NetMapOperator",
                         net=_subnet("VECTOR", width, inner))
            width = out_width
        elif isinstance(module, Bidirectional):
            forward, _ = _chain_layers([module.forward_rnn],
                                       prefix + name + ".forward.", arrays, width)
            backward, _ = _chain_layers([module.backward_rnn],
                                        prefix + name + ".backward.", arrays, width)
            layer.update(type="NetBidirectionalOperator",
                         net=_subnet("VECTOR_SEQUENCE", width, forward),
                         backward_net=_subnet("VECTOR_SEQUENCE", width, backward),
                         join=module.join)
            width = module.output_size
        else:
            layer.update(type="ElementwiseLayer", function=_ELEMENTWISE[type(module)])
        layers.append(layer)
    if not layers:
        raise ValueError("the net has no layers besides dropout")
    return layers, width


def _layers_and_arrays(net):
    """Returns (list of layer field dicts, dict of arrays) for a SequenceNet."""
    kind, size = net.input_spec()
    arrays = {}
    layers, _ = _chain_layers(list(net.layers), "", arrays,
                              None if kind == "tokens" else size)
    return layers, arrays


def _write_input(w, spec):
    w.open("inputs")
    w.field("name", spec["name"])
    w.field("kind", _Enum(spec["kind"]))
    if "vocab_size" in spec:
        w.field("vocab_size", int(spec["vocab_size"]))
    if "width" in spec:
        w.field("width", int(spec["width"]))
    w.close()


def _write_spec(w, spec):
    """Writes a NetSpec given as a dict (see :func:`format_net`)."""
    if spec.get("name"):
        w.field("name", spec["name"])
    for inp in spec.get("inputs", []):
        _write_input(w, inp)
    _write_layers(w, spec.get("layers", []))
    for out in spec.get("outputs", []):
        w.open("outputs")
        w.field("name", out["name"])
        if out.get("source"):
            w.field("source", out["source"])
        w.close()


def _write_layers(w, layers):
    for layer in layers:
        unknown = sorted(set(layer) - set(_LAYER_FIELDS))
        if unknown:
            raise ValueError("layer %r: unknown fields %s"
                             % (layer.get("name"), ", ".join(unknown)))
        w.open("layers")
        for field in _LAYER_FIELDS:
            if field not in layer:
                continue
            value = layer[field]
            if field in ("net", "backward_net"):
                w.open(field)
                _write_spec(w, value)
                w.close()
            elif isinstance(value, (list, tuple)):
                for item in value:
                    w.field(field, item)
            elif isinstance(value, float):
                w.field(field, _Enum(repr(value)))
            else:
                w.field(field, value)
        w.close()


def format_net(spec):
    """Formats a net description given as nested dicts in protobuf text
    format, for nets the chain exporter cannot express (several inputs or
    outputs, wiring, Fold and Nest operators).

    ``spec`` holds ``name``, ``inputs`` (dicts of ``name``, ``kind``
    -- "TOKEN_SEQUENCE", "VECTOR_SEQUENCE" or "VECTOR" -- and ``width`` or
    ``vocab_size``), ``layers`` (dicts of LayerSpec fields: ``name``,
    ``type``, ``inputs`` (a list of "port=source" or "source" strings),
    ``size``, ``function``, ``net`` and ``backward_net`` (nested specs),
    ``join``, ``iterations``, ``score``, ``dimensions``, ``probability``,
    ...) and ``outputs`` (dicts of ``name`` and ``source``). Returns the
    text.
    """
    w = _Writer()
    _write_spec(w, spec)
    return w.text()


def _ends_in_softmax(modules):
    effective = [m for m in modules if not isinstance(m, nn.Dropout)]
    if not effective:
        return False
    last = effective[-1]
    if isinstance(last, Map):
        return _ends_in_softmax(list(last.net))
    return isinstance(last, nn.Softmax)


def _node_layers(name, module, sources, width, arrays):
    """The layer specs of one graph node, named and wired (see GraphNet);
    adds the node's arrays."""
    if type(module) in _GLUE:
        return [{"name": name, "type": _GLUE[type(module)], "inputs": list(sources)}]
    if isinstance(module, Reshape):
        return [{"name": name, "type": "ReshapeLayer", "inputs": list(sources),
                 "dimensions": list(module.dims)}]
    if isinstance(module, nn.Dropout):
        return [{"name": name, "type": "DropoutLayer", "inputs": list(sources),
                 "probability": float(module.p)}]
    own = {}
    layers, _ = _chain_layers([module], "", own, width)
    names = _node_layer_names(name, len(layers))
    renames = {layer["name"]: new for layer, new in zip(layers, names)}
    for key, array in own.items():
        old, _, rest = key.partition(".")
        arrays["%s.%s" % (renames[old], rest)] = array
    for layer, new in zip(layers, names):
        layer["name"] = new
    first = layers[0]
    wired = {"name": first["name"], "type": first["type"], "inputs": list(sources)}
    wired.update((k, v) for k, v in first.items() if k not in wired)
    layers[0] = wired
    return layers


def _graph_spec(net):
    """(NetSpec dict, arrays) for a GraphNet."""
    widths = {}
    inputs = []
    for name, kind, size in net.input_specs:
        entry = {"name": name, "kind": _INPUT_KINDS[kind]}
        if kind == "tokens":
            entry["vocab_size"] = size
            widths[name] = None
        else:
            entry["width"] = size
            widths[name] = size
        inputs.append(entry)
    # Re-validate: the modules may have been changed since construction.
    GraphNet(net.input_specs,
             [(n, net.node_modules[n], s) for n, s in net.node_specs],
             net.output_specs)
    values = {}
    arrays = {}
    layers = []
    for name, kind, size in net.input_specs:
        values[name] = _Value(size, None if kind == "vector" else (name,),
                              kind == "tokens")
    for name, sources in net.node_specs:
        module = net.node_modules[name]
        ins = [net._source(values, s, name) for s in sources]
        width = None if ins[0].tokens else ins[0].width
        layers.extend(_node_layers(name, module, sources, width, arrays))
        values[name] = _check_node(name, module, ins)
    outputs = [{"name": out, "source": str(source)}
               for out, source in net.output_specs]
    return {"inputs": inputs, "layers": layers, "outputs": outputs}, arrays


def _write_graph(net, version_dir, name, labels, alphabet):
    if labels is not None or alphabet is not None:
        raise ValueError("labels and alphabets are not supported for a GraphNet")
    spec, arrays = _graph_spec(net)
    spec["name"] = name
    os.makedirs(version_dir, exist_ok=True)
    with open(os.path.join(version_dir, "net.pbtxt"), "w", encoding="utf-8") as f:
        f.write(format_net(spec))
    write_safetensors(os.path.join(version_dir, "weights.safetensors"), arrays)


def write_net(net, version_dir, name, labels=None, alphabet=None,
              output_name="output", ignore_case=False, unknown_token=False):
    """Writes ``net.pbtxt`` and ``weights.safetensors`` into ``version_dir``.

    ``labels`` (a list of class names) adds a class decoder to the output;
    the net must then end in nn.Softmax (or in a Map whose chain ends in
    one). ``alphabet`` (a string) adds a characters encoder to a token
    input. Raises ValueError for anything the format cannot express.
    """
    if isinstance(net, GraphNet):
        _write_graph(net, version_dir, name, labels, alphabet)
        return
    if not isinstance(net, SequenceNet):
        raise ValueError("export needs a SequenceNet or a GraphNet, got %s"
                         % type(net).__name__)
    # Re-validate: the modules may have been changed since construction.
    _check_chain(list(net.layers), net.input_width)
    layers, arrays = _layers_and_arrays(net)
    kind, size = net.input_spec()
    if not output_name:
        raise ValueError("the output needs a name")
    if output_name == "input":
        raise ValueError("the output cannot be named 'input'")

    if alphabet is not None:
        if kind != "tokens":
            raise ValueError("an alphabet needs a net that starts with nn.Embedding")
        if not alphabet:
            raise ValueError("the alphabet is empty")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("the alphabet repeats a character")
        needed = len(alphabet) + (1 if unknown_token else 0)
        if needed > size:
            raise ValueError("the alphabet needs %d token ids but the embedding "
                             "has vocab_size %d" % (needed, size))
        if ignore_case and alphabet != alphabet.lower():
            raise ValueError("ignore_case needs a lower-case alphabet")
    if labels is not None:
        labels = [str(label) for label in labels]
        if not _ends_in_softmax(list(net.layers)):
            raise ValueError("class labels need a net that ends in nn.Softmax")
        out_width = net.output_width()
        if out_width is not None and out_width != len(labels):
            raise ValueError("%d labels for an output of width %d"
                             % (len(labels), out_width))
        if len(set(labels)) != len(labels):
            raise ValueError("the labels repeat a name")

    w = _Writer()
    w.field("name", name)
    w.open("inputs")
    w.field("name", "input")
    if kind == "tokens":
        w.field("kind", _Enum("TOKEN_SEQUENCE"))
        w.field("vocab_size", int(size))
    else:
        w.field("kind", _Enum("VECTOR_SEQUENCE"))
        w.field("width", int(size))
    if alphabet is not None:
        w.open("encoder")
        w.open("characters")
        w.field("alphabet", alphabet)
        if ignore_case:
            w.field("ignore_case", True)
        if unknown_token:
            w.field("unknown_token", True)
        w.close()
        w.close()
    w.close()
    _write_layers(w, layers)
    w.open("outputs")
    w.field("name", output_name)
    if labels is not None:
        w.open("decoder")
        w.open("class_decoder")
        for label in labels:
            w.field("labels", label)
        w.close()
        w.close()
    w.close()

    os.makedirs(version_dir, exist_ok=True)
    with open(os.path.join(version_dir, "net.pbtxt"), "w", encoding="utf-8") as f:
        f.write(w.text())
    write_safetensors(os.path.join(version_dir, "weights.safetensors"), arrays)


def write_config(model_dir, name, config=None):
    """Writes ``config.pbtxt`` (a ModelConfig) into ``model_dir``."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(_CONFIG_FIELDS) - {"name"})
    if unknown:
        raise ValueError("unknown ModelConfig fields: %s" % ", ".join(unknown))
    if config.get("name", name) != name:
        raise ValueError("config name %r differs from the model name %r"
                         % (config["name"], name))
    w = _Writer()
    w.field("name", name)
    if config.get("description"):
        w.field("description", str(config["description"]))
    for field in ("max_sequence_length", "max_batch_size"):
        if config.get(field):
            value = int(config[field])
            if value < 0:
                raise ValueError("%s must not be negative" % field)
            w.field(field, value)
    if config.get("device"):
        w.field("device", str(config["device"]))
    for version in config.get("versions") or ():
        w.field("versions", int(version))
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.pbtxt"), "w", encoding="utf-8") as f:
        f.write(w.text())


def export(net, model_root, model_name, version=1, labels=None, alphabet=None,
           output_name="output", config=None, ignore_case=False,
           unknown_token=False):
    """Exports a SequenceNet (or a GraphNet, without labels or alphabet) as
    version ``version`` of model ``model_name``.

    Writes ``<model_root>/<model_name>/config.pbtxt`` (``config`` is a dict of
    ModelConfig fields: description, max_sequence_length, max_batch_size,
    device, versions) and ``<model_root>/<model_name>/<version>/net.pbtxt``
    and ``weights.safetensors``. ``labels`` and ``alphabet`` default to the
    net's own attributes (set by :func:`load`). Returns the version folder.
    Raises ValueError naming any module the format cannot express.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", model_name or ""):
        raise ValueError("bad model name %r" % (model_name,))
    if int(version) < 1:
        raise ValueError("versions are numbered from 1")
    if labels is None:
        labels = getattr(net, "labels", None)
    if alphabet is None:
        alphabet = getattr(net, "alphabet", None)
    model_dir = os.path.join(model_root, model_name)
    version_dir = os.path.join(model_dir, str(int(version)))
    write_net(net, version_dir, model_name, labels=labels, alphabet=alphabet,
              output_name=output_name, ignore_case=ignore_case,
              unknown_token=unknown_token)
    write_config(model_dir, model_name, config)
    return version_dir


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------


class _Arrays:
    """The arrays of a weights file, remembering which ones were read."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.used = set()

    def columns(self, name):
        if name not in self.arrays:
            raise ValueError("weights.safetensors has no array %r" % name)
        array = self.arrays[name]
        if array.ndim != 2:
            raise ValueError("array %r has shape %s, expected 2 dimensions"
                             % (name, tuple(array.shape)))
        return int(array.shape[1])

    def take(self, name, shape):
        if name not in self.arrays:
            raise ValueError("weights.safetensors has no array %r" % name)
        array = self.arrays[name]
        if tuple(array.shape) != tuple(shape):
            raise ValueError("array %r has shape %s, expected %s"
                             % (name, tuple(array.shape), tuple(shape)))
        self.used.add(name)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _stack_name(name, base, k):
    return name == "%s_l%d" % (base, k)


def _copy_recurrent(module, k, direction, arrays, prefix, in_width):
    """Fills layer k (direction "" or "_reverse") of a recurrent module from
    the arrays of the layer named by ``prefix`` ("<...>.<layer>")."""
    gates = _RECURRENT_LAYERS[type(module)][1]
    hidden = module.hidden_size
    suffix = "_l%d%s" % (k, direction)
    with torch.no_grad():
        getattr(module, "weight_ih" + suffix).copy_(
            arrays.take(prefix + ".weight_ih", (gates * hidden, in_width)))
        getattr(module, "weight_hh" + suffix).copy_(
            arrays.take(prefix + ".weight_hh", (gates * hidden, hidden)))
        getattr(module, "bias_ih" + suffix).copy_(
            arrays.take(prefix + ".bias_ih", (gates * hidden,)))
        getattr(module, "bias_hh" + suffix).copy_(
            arrays.take(prefix + ".bias_hh", (gates * hidden,)))


def _recurrent_kind(layer):
    """(module class, size, function) of a recurrent layer spec."""
    name = _one(layer, "name", "")
    ltype = _one(layer, "type", "")
    if ltype == "GatedRecurrentLayer" and _one(layer, "reset_before") == "true":
        raise ValueError("layer %r: reset_before has no PyTorch equivalent" % name)
    function = _one(layer, "function", "") or "tanh"
    if ltype == "BasicRecurrentLayer" and function not in ("tanh", "relu"):
        raise ValueError("layer %r: unsupported function %r" % (name, function))
    if ltype != "BasicRecurrentLayer":
        function = None
    return _RECURRENT_MODULES[ltype], int(_one(layer, "size", 0)), function


def _new_recurrent(cls, in_width, size, function, num_layers, bidirectional):
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional,
                  batch_first=True)
    if cls is nn.RNN:
        kwargs["nonlinearity"] = function
    return cls(in_width, size, **kwargs)


def _plain_bidirectional(layer):
    """The recurrent layer spec of a NetBidirectionalOperator that an
    nn.RNN/GRU/LSTM(bidirectional=True) wrote (no backward net, catenate,
    one recurrent layer), else None."""
    if _one(layer, "type", "") != "NetBidirectionalOperator":
        return None
    if _one(layer, "backward_net") is not None:
        return None
    if (_one(layer, "join", "") or "catenate") != "catenate":
        return None
    net = _one(layer, "net")
    if (net is None or len(net.get("inputs", [])) != 1
            or len(net.get("layers", [])) != 1 or net.get("outputs")):
        return None
    inner = net["layers"][0]
    if _one(inner, "type", "") not in _RECURRENT_MODULES or inner.get("inputs"):
        return None
    return inner


def _subnet_layers(layer, field, where):
    name = _one(layer, "name", "")
    net = _one(layer, field)
    if net is None:
        raise ValueError("layer %r: %s has no %s" % (name, where, field))
    if len(net.get("inputs", [])) != 1:
        raise ValueError("layer %r: the sub-net needs one input, it has %d"
                         % (name, len(net.get("inputs", []))))
    if net.get("outputs"):
        raise ValueError("layer %r: only sub-nets that output their last layer "
                         "are supported" % name)
    return net.get("layers", [])


def _load_chain(layers, arrays, prefix, width, top):
    """Modules for a chain of layer specs whose input is ``width`` wide (None
    for token ids). Returns (modules, output width)."""
    modules = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        name = _one(layer, "name", "")
        ltype = _one(layer, "type", "")
        full = prefix + name
        if layer.get("inputs"):
            raise ValueError("layer %r: only chains are supported (no inputs)" % name)
        size = int(_one(layer, "size", 0))
        function = _one(layer, "function", "")
        i += 1
        if ltype == "EmbeddingLayer":
            if not top or modules or width is not None:
                raise ValueError("layer %r: an embedding must come first" % name)
            vocab = int(_one(layer, "vocab_size", 0))
            module = nn.Embedding(vocab, size)
            with torch.no_grad():
                module.weight.copy_(arrays.take(full + ".weight", (vocab, size)))
            width = size
        elif ltype == "LinearLayer":
            in_width = arrays.columns(full + ".weight")
            if width is not None and in_width != width:
                raise ValueError("layer %r: weight has %d columns, input width is %d"
                                 % (name, in_width, width))
            module = nn.Linear(in_width, size)
            with torch.no_grad():
                module.weight.copy_(arrays.take(full + ".weight", (size, in_width)))
                module.bias.copy_(arrays.take(full + ".bias", (size,)))
            width = size
        elif ltype == "ElementwiseLayer":
            if function not in _ELEMENTWISE_MODULES:
                raise ValueError("layer %r: unsupported function %r" % (name, function))
            module = _ELEMENTWISE_MODULES[function]()
        elif ltype == "SoftmaxLayer":
            module = nn.Softmax(dim=-1)
        elif ltype in _SEQUENCE_MODULES:
            module = _SEQUENCE_MODULES[ltype]()
        elif ltype in _RECURRENT_MODULES:
            # Layers named "<name>_l1", "<name>_l2", ... of the same kind
            # right after it are the upper layers of one stacked module.
            cls, size, function = _recurrent_kind(layer)
            stack = [layer]
            while (i < len(layers) and _stack_name(_one(layers[i], "name", ""), name, len(stack))
                   and _one(layers[i], "type", "") == ltype
                   and not layers[i].get("inputs")
                   and _recurrent_kind(layers[i]) == (cls, size, function)):
                stack.append(layers[i])
                i += 1
            in_width = arrays.columns(full + ".weight_ih")
            if width is not None and in_width != width:
                raise ValueError("layer %r: weight_ih has %d columns, input width "
                                 "is %d" % (name, in_width, width))
            module = _new_recurrent(cls, in_width, size, function, len(stack), False)
            for k, part in enumerate(stack):
                _copy_recurrent(module, k, "", arrays, prefix + _one(part, "name", ""),
                                in_width if k == 0 else size)
            width = size
        elif ltype == "NetBidirectionalOperator" and _plain_bidirectional(layer) is not None:
            inner = _plain_bidirectional(layer)
            cls, size, function = _recurrent_kind(inner)
            inner_name = _one(inner, "name", "")
            stack = [layer]
            while (i < len(layers) and _stack_name(_one(layers[i], "name", ""), name, len(stack))
                   and not layers[i].get("inputs")
                   and _plain_bidirectional(layers[i]) is not None
                   and _one(_plain_bidirectional(layers[i]), "name", "") == inner_name
                   and _recurrent_kind(_plain_bidirectional(layers[i])) == (cls, size, function)):
                stack.append(layers[i])
                i += 1
            in_width = arrays.columns("%s.forward.%s.weight_ih" % (full, inner_name))
            if width is not None and in_width != width:
                raise ValueError("layer %r: weight_ih has %d columns, input width "
                                 "is %d" % (name, in_width, width))
            module = _new_recurrent(cls, in_width, size, function, len(stack), True)
            for k, part in enumerate(stack):
                part_prefix = prefix + _one(part, "name", "")
                k_width = in_width if k == 0 else 2 * size
                _copy_recurrent(module, k, "", arrays,
                                "%s.forward.%s" % (part_prefix, inner_name), k_width)
                _copy_recurrent(module, k, "_reverse", arrays,
                                "%s.backward.%s" % (part_prefix, inner_name), k_width)
            width = 2 * size
        elif ltype == "NetBidirectionalOperator":
            join = _one(layer, "join", "") or "catenate"
            if join not in _JOINS:
                raise ValueError("layer %r: unsupported join %r" % (name, join))
            forward_layers = _subnet_layers(layer, "net", "the operator")
            backward_layers = (_subnet_layers(layer, "backward_net", "the operator")
                               if _one(layer, "backward_net") is not None
                               else forward_layers)
            parts = []
            for part, part_layers in (("forward", forward_layers),
                                      ("backward", backward_layers)):
                inner, _ = _load_chain(part_layers, arrays,
                                       "%s.%s." % (full, part), width, False)
                if len(inner) != 1 or type(inner[0]) not in _RECURRENT:
                    raise ValueError("layer %r: only %s sub-nets of one recurrent "
                                     "module are supported" % (name, part))
                parts.append(inner[0])
            module = Bidirectional(parts[0], parts[1], join=join)
            width = module.output_size
        elif ltype == "NetMapOperator":
            inner, width = _load_chain(_subnet_layers(layer, "net", "the operator"),
                                       arrays, full + ".", width, False)
            for m in inner:
                if type(m) not in _ROWWISE:
                    raise ValueError("layer %r: only row-wise layers are supported "
                                     "in a mapped sub-net, found %s"
                                     % (name, type(m).__name__))
            module = Map(nn.Sequential(*inner))
        else:
            raise ValueError("layer %r: unsupported type %r" % (name, ltype))
        modules.append(module)
    if not modules:
        raise ValueError("a net has no layers")
    return modules, width


def load(version_dir):
    """Reads a version folder written by :func:`export` (or :func:`write_net`)
    back into a SequenceNet in eval mode.

    The net's ``name``, ``alphabet``, ``labels`` and ``output_name``
    attributes are filled from net.pbtxt. Stacked recurrent layers named as
    the exporter names them load as one multi-layer module, and
    NetBidirectionalOperators without a backward net as bidirectional
    modules, so that a loaded net has the structure of the exported one.
    """
    with open(os.path.join(version_dir, "net.pbtxt"), encoding="utf-8") as f:
        spec = parse_text_proto(f.read())
    arrays = _Arrays(read_safetensors(os.path.join(version_dir, "weights.safetensors")))

    inputs = spec.get("inputs", [])
    if (len(inputs) > 1 or len(spec.get("outputs", [])) > 1
            or any(layer.get("inputs") for layer in spec.get("layers", []))):
        raise NotImplementedError(
            "load reads chains only; this net has several inputs or outputs, "
            "or wired layers (a GraphNet export)")
    if len(inputs) != 1:
        raise ValueError("expected one net input, found %d" % len(inputs))
    inp = inputs[0]
    kind = _one(inp, "kind")
    alphabet = None
    ignore_case = unknown_token = False
    encoder = _one(inp, "encoder")
    if encoder is not None:
        chars = _one(encoder, "characters")
        if chars is None:
            raise ValueError("unsupported input encoder: %s" % sorted(encoder))
        alphabet = _one(chars, "alphabet", "")
        ignore_case = _one(chars, "ignore_case") == "true"
        unknown_token = _one(chars, "unknown_token") == "true"
    if kind == "TOKEN_SEQUENCE":
        width = None
    elif kind == "VECTOR_SEQUENCE":
        width = int(_one(inp, "width", 0))
    else:
        raise ValueError("unsupported input kind %r" % (kind,))

    modules, _ = _load_chain(spec.get("layers", []), arrays, "", width, True)
    unused = sorted(set(arrays.arrays) - arrays.used)
    if unused:
        raise ValueError("weights.safetensors has arrays no layer uses: %s"
                         % ", ".join(unused))

    input_width = int(_one(inp, "width", 0)) if kind == "VECTOR_SEQUENCE" else None
    net = SequenceNet(modules, input_width=input_width)
    outputs = spec.get("outputs", [])
    if len(outputs) > 1:
        raise ValueError("expected one net output, found %d" % len(outputs))
    net.output_name = "output"
    if outputs:
        out = outputs[0]
        net.output_name = _one(out, "name", "output")
        source = _one(out, "source", "")
        if source and source != _one(spec["layers"][-1], "name", ""):
            raise ValueError("only the last layer can be the output")
        decoder = _one(out, "decoder")
        if decoder is not None:
            cls = _one(decoder, "class_decoder")
            if cls is None:
                raise ValueError("unsupported output decoder: %s" % sorted(decoder))
            net.labels = list(cls.get("labels", []))
    net.alphabet = alphabet
    net.ignore_case = ignore_case
    net.unknown_token = unknown_token
    net.name = _one(spec, "name", None)
    net.eval()
    return net


def read_config(model_dir):
    """Reads ``config.pbtxt`` from a model folder into a dict of fields."""
    with open(os.path.join(model_dir, "config.pbtxt"), encoding="utf-8") as f:
        fields = parse_text_proto(f.read())
    config = {}
    for name, values in fields.items():
        config[name] = list(values) if name == "versions" else values[-1]
    return config
