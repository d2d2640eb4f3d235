"""Export PyTorch sequence models to the rnnserve model format, and read them back.

A model version folder holds ``net.pbtxt`` (a text-format
``rnnserve.v1.NetSpec``) and ``weights.safetensors`` (the arrays, all F32,
little-endian); the model folder above it holds ``config.pbtxt`` (a
text-format ``rnnserve.v1.ModelConfig``)::

    <model_root>/<model_name>/config.pbtxt
    <model_root>/<model_name>/<version>/net.pbtxt
    <model_root>/<model_name>/<version>/weights.safetensors

The exporter handles chains of layers: a :class:`SequenceNet` built from the
modules below, each reading the output of the one before it. Arrays are named
``"<layer name>.<array>"``; recurrent gate orders are PyTorch's.

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
SequenceLast()                      SequenceLastLayer           (none)
nn.Dropout                          (omitted: identity at inference)
==================================  ==========================  =====================================

Restrictions: recurrent modules must have ``num_layers=1`` and
``bidirectional=False`` (and ``proj_size=0`` for LSTM); ``batch_first`` may be
either. ELU must have ``alpha=1``, Softplus ``beta=1``, GELU
``approximate="none"``; nn.Embedding must not use ``max_norm``; an
nn.Embedding may only come first. Recurrent layers, SequenceLast and
Embedding cannot follow SequenceLast. Anything else raises ``ValueError``.

The net has one input, ``"input"``: a ``TOKEN_SEQUENCE`` of ``vocab_size``
ids when the first layer is an embedding, otherwise a ``VECTOR_SEQUENCE`` of
``width`` floats. It has one output (``"output"`` unless renamed); with class
labels the output gets a class decoder, and the net must end in a softmax.

Entry points: :func:`export`, :func:`write_net`, :func:`load`,
:func:`read_safetensors`, :func:`write_safetensors`, :func:`pad_batch`,
:func:`encode_text`.
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
    "SequenceNet",
    "export",
    "write_net",
    "load",
    "read_safetensors",
    "write_safetensors",
    "write_config",
    "parse_text_proto",
    "pad_batch",
    "encode_text",
]


# --------------------------------------------------------------------------
# The PyTorch side
# --------------------------------------------------------------------------


class SequenceLast(nn.Module):
    """Takes the last element of each sequence (at index length - 1).

    Used inside :class:`SequenceNet`, which supplies the lengths; turns a
    padded [B, T, D] batch into [B, D].
    """

    def forward(self, x, lengths):
        index = lengths.to(device=x.device, dtype=torch.long) - 1
        return x[torch.arange(x.shape[0], device=x.device), index]


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
_SUPPORTED = frozenset((nn.Embedding, nn.Linear, nn.Softmax, nn.Dropout, SequenceLast)
                       + _RECURRENT + tuple(_ELEMENTWISE))


def _describe(module):
    return repr(module)


def _check_module(module, position, after_last, width):
    """Validates one module of a chain; returns the width after it.

    ``width`` is the feature width flowing in (None when not known).
    """
    # Exact types only: a subclass may compute something else.
    if type(module) not in _SUPPORTED:
        raise ValueError("unsupported module at position %d: %s"
                         % (position, _describe(module)))
    if isinstance(module, nn.Dropout):
        return width
    if isinstance(module, nn.Embedding):
        if position != 0:
            raise ValueError("nn.Embedding must be the first module, found at "
                             "position %d: %s" % (position, _describe(module)))
        if module.max_norm is not None:
            raise ValueError("unsupported module: nn.Embedding with max_norm "
                             "(renormalises at inference): %s" % _describe(module))
        return module.embedding_dim
    if isinstance(module, nn.Linear):
        if width is not None and width != module.in_features:
            raise ValueError("nn.Linear at position %d expects %d inputs but "
                             "receives %d" % (position, module.in_features, width))
        return module.out_features
    if isinstance(module, nn.Softmax):
        if module.dim != -1:
            raise ValueError("unsupported module: nn.Softmax must use dim=-1, "
                             "got %s" % _describe(module))
        return width
    if isinstance(module, SequenceLast):
        if after_last:
            raise ValueError("SequenceLast at position %d follows another "
                             "SequenceLast" % position)
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
    if isinstance(module, tuple(_ELEMENTWISE)):
        return width
    # Recurrent modules.
    if after_last:
        raise ValueError("recurrent module at position %d follows SequenceLast: "
                         "%s" % (position, _describe(module)))
    if module.num_layers != 1:
        raise ValueError("unsupported module: %s with num_layers=%d (stack "
                         "single-layer modules instead): %s"
                         % (type(module).__name__, module.num_layers, _describe(module)))
    if module.bidirectional:
        raise ValueError("unsupported module: bidirectional %s: %s"
                         % (type(module).__name__, _describe(module)))
    if getattr(module, "proj_size", 0):
        raise ValueError("unsupported module: nn.LSTM with proj_size: %s"
                         % _describe(module))
    if isinstance(module, nn.RNN) and module.nonlinearity not in ("tanh", "relu"):
        raise ValueError("unsupported module: nn.RNN with nonlinearity %r: %s"
                         % (module.nonlinearity, _describe(module)))
    if width is not None and width != module.input_size:
        raise ValueError("%s at position %d expects %d inputs but receives %d"
                         % (type(module).__name__, position, module.input_size, width))
    return module.hidden_size


def _as_lengths(lengths):
    if isinstance(lengths, torch.Tensor):
        return lengths.detach().to(device="cpu", dtype=torch.long)
    return torch.as_tensor(np.asarray(lengths, dtype=np.int64))


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
    [B, T, D] tensor (positions past a sequence's length are unspecified), or
    [B, D] once a SequenceLast has run.

    Attributes kept for export and filled by :func:`load`: ``alphabet``,
    ``labels``, ``output_name`` and ``name`` (None when unset).
    """

    def __init__(self, modules, input_width=None):
        super().__init__()
        modules = list(modules)
        if not modules:
            raise ValueError("a SequenceNet needs at least one module")
        width = input_width
        after_last = False
        for i, module in enumerate(modules):
            width = _check_module(module, i, after_last, width)
            if isinstance(module, SequenceLast):
                after_last = True
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
        for module in self.layers:
            if isinstance(module, nn.Linear):
                return "vectors", module.in_features
            if isinstance(module, _RECURRENT):
                return "vectors", module.input_size
        if self.input_width is None:
            raise ValueError("cannot infer the input width of this net; pass "
                             "input_width to SequenceNet")
        return "vectors", int(self.input_width)

    def output_width(self):
        """The feature width of the net's output."""
        width = self.input_spec()[1] if not self.takes_tokens else None
        for module in self.layers:
            if isinstance(module, nn.Embedding):
                width = module.embedding_dim
            elif isinstance(module, nn.Linear):
                width = module.out_features
            elif isinstance(module, _RECURRENT):
                width = module.hidden_size
        return width

    @property
    def ends_with_sequence(self):
        return not any(isinstance(m, SequenceLast) for m in self.layers)

    def forward(self, x, lengths):
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
            if isinstance(module, SequenceLast):
                x = module(x, lengths)
            elif isinstance(module, _RECURRENT):
                x = self._run_recurrent(module, x, lengths)
            else:
                x = module(x)
        return x

    @staticmethod
    def _run_recurrent(module, x, lengths):
        steps = x.shape[1]
        if not module.batch_first:
            x = x.transpose(0, 1)
        packed = pack_padded_sequence(x, lengths, batch_first=module.batch_first,
                                      enforce_sorted=False)
        out, _ = module(packed)
        out, _ = pad_packed_sequence(out, batch_first=module.batch_first,
                                     total_length=steps)
        if not module.batch_first:
            out = out.transpose(0, 1)
        return out

    def run(self, sequences):
        """Runs a list of sequences (lists of ids, or [T, D] arrays).

        Returns one numpy array per sequence: [T_i, D] for nets that end in a
        sequence, [D] for nets that end after SequenceLast.
        """
        x, lengths = pad_batch(sequences, tokens=self.takes_tokens)
        with torch.no_grad():
            out = self.forward(x, lengths).cpu().numpy()
        if self.ends_with_sequence:
            return [out[i, :int(n)] for i, n in enumerate(lengths)]
        return [out[i] for i in range(len(sequences))]


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


def _layer_base_name(module):
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Softmax):
        return "softmax"
    if isinstance(module, SequenceLast):
        return "last"
    if isinstance(module, nn.LSTM):
        return "lstm"
    if isinstance(module, nn.GRU):
        return "gru"
    if isinstance(module, nn.RNN):
        return "rnn"
    return _ELEMENTWISE[type(module)]


def _f32(tensor):
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype="<f4")


def _layers_and_arrays(net):
    """Returns (list of layer field dicts, dict of arrays) for a SequenceNet."""
    layers = []
    arrays = {}
    used = {}
    for module in net.layers:
        if isinstance(module, nn.Dropout):
            continue
        if type(module) not in _SUPPORTED:
            raise ValueError("unsupported module: %s" % _describe(module))
        base = _layer_base_name(module)
        used[base] = used.get(base, 0) + 1
        name = base if used[base] == 1 else "%s_%d" % (base, used[base])
        layer = {"name": name}
        if isinstance(module, nn.Embedding):
            layer.update(type="EmbeddingLayer", size=module.embedding_dim,
                         vocab_size=module.num_embeddings)
            arrays[name + ".weight"] = _f32(module.weight)
        elif isinstance(module, nn.Linear):
            layer.update(type="LinearLayer", size=module.out_features)
            arrays[name + ".weight"] = _f32(module.weight)
            arrays[name + ".bias"] = (_f32(module.bias) if module.bias is not None
                                      else np.zeros(module.out_features, "<f4"))
        elif isinstance(module, nn.Softmax):
            layer.update(type="SoftmaxLayer")
        elif isinstance(module, SequenceLast):
            layer.update(type="SequenceLastLayer")
        elif isinstance(module, _RECURRENT):
            if isinstance(module, nn.LSTM):
                layer.update(type="LongShortTermMemoryLayer", size=module.hidden_size)
                gates = 4
            elif isinstance(module, nn.GRU):
                layer.update(type="GatedRecurrentLayer", size=module.hidden_size)
                gates = 3
            else:
                layer.update(type="BasicRecurrentLayer", size=module.hidden_size,
                             function=module.nonlinearity)
                gates = 1
            hidden = module.hidden_size
            arrays[name + ".weight_ih"] = _f32(module.weight_ih_l0)
            arrays[name + ".weight_hh"] = _f32(module.weight_hh_l0)
            for bias in ("bias_ih", "bias_hh"):
                param = getattr(module, bias + "_l0", None) if module.bias else None
                arrays[name + "." + bias] = (_f32(param) if param is not None
                                             else np.zeros(gates * hidden, "<f4"))
        else:
            layer.update(type="ElementwiseLayer", function=_ELEMENTWISE[type(module)])
        layers.append(layer)
    if not layers:
        raise ValueError("the net has no layers besides dropout")
    return layers, arrays


def write_net(net, version_dir, name, labels=None, alphabet=None,
              output_name="output", ignore_case=False, unknown_token=False):
    """Writes ``net.pbtxt`` and ``weights.safetensors`` into ``version_dir``.

    ``labels`` (a list of class names) adds a class decoder to the output;
    the net must then end in nn.Softmax. ``alphabet`` (a string) adds a
    characters encoder to a token input. Raises ValueError for anything the
    format cannot express.
    """
    if not isinstance(net, SequenceNet):
        raise ValueError("export needs a SequenceNet, got %s" % type(net).__name__)
    # Re-validate: the modules may have been changed since construction.
    width = net.input_width
    after_last = False
    for i, module in enumerate(net.layers):
        width = _check_module(module, i, after_last, width)
        after_last = after_last or isinstance(module, SequenceLast)
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
        last = [m for m in net.layers if not isinstance(m, nn.Dropout)][-1]
        if not isinstance(last, nn.Softmax):
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
    for layer in layers:
        w.open("layers")
        for field in ("name", "type", "size", "vocab_size", "function"):
            if field in layer:
                w.field(field, layer[field])
        w.close()
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
    """Exports a SequenceNet as version ``version`` of model ``model_name``.

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


def _array(arrays, name, shape):
    if name not in arrays:
        raise ValueError("weights.safetensors has no array %r" % name)
    array = arrays[name]
    if tuple(array.shape) != tuple(shape):
        raise ValueError("array %r has shape %s, expected %s"
                         % (name, tuple(array.shape), tuple(shape)))
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def load(version_dir):
    """Reads a version folder written by :func:`export` (or :func:`write_net`)
    back into a SequenceNet in eval mode.

    The net's ``name``, ``alphabet``, ``labels`` and ``output_name``
    attributes are filled from net.pbtxt.
    """
    with open(os.path.join(version_dir, "net.pbtxt"), encoding="utf-8") as f:
        spec = parse_text_proto(f.read())
    arrays = read_safetensors(os.path.join(version_dir, "weights.safetensors"))

    inputs = spec.get("inputs", [])
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

    modules = []
    for i, layer in enumerate(spec.get("layers", [])):
        name = _one(layer, "name", "")
        ltype = _one(layer, "type", "")
        if layer.get("inputs"):
            raise ValueError("layer %r: only chains are supported (no inputs)" % name)
        size = int(_one(layer, "size", 0))
        function = _one(layer, "function", "")
        if ltype == "EmbeddingLayer":
            vocab = int(_one(layer, "vocab_size", 0))
            module = nn.Embedding(vocab, size)
            with torch.no_grad():
                module.weight.copy_(_array(arrays, name + ".weight", (vocab, size)))
            width = size
        elif ltype == "LinearLayer":
            if name + ".weight" not in arrays:
                raise ValueError("weights.safetensors has no array %r" % (name + ".weight"))
            in_width = arrays[name + ".weight"].shape[1]
            if width is not None and in_width != width:
                raise ValueError("layer %r: weight has %d columns, input width is %d"
                                 % (name, in_width, width))
            module = nn.Linear(in_width, size)
            with torch.no_grad():
                module.weight.copy_(_array(arrays, name + ".weight", (size, in_width)))
                module.bias.copy_(_array(arrays, name + ".bias", (size,)))
            width = size
        elif ltype == "ElementwiseLayer":
            if function not in _ELEMENTWISE_MODULES:
                raise ValueError("layer %r: unsupported function %r" % (name, function))
            module = _ELEMENTWISE_MODULES[function]()
        elif ltype == "SoftmaxLayer":
            module = nn.Softmax(dim=-1)
        elif ltype == "SequenceLastLayer":
            module = SequenceLast()
        elif ltype in ("BasicRecurrentLayer", "GatedRecurrentLayer",
                       "LongShortTermMemoryLayer"):
            key = name + ".weight_ih"
            if key not in arrays:
                raise ValueError("weights.safetensors has no array %r" % key)
            in_width = arrays[key].shape[1]
            if ltype == "BasicRecurrentLayer":
                module = nn.RNN(in_width, size, nonlinearity=function or "tanh",
                                batch_first=True)
                gates = 1
            elif ltype == "GatedRecurrentLayer":
                if _one(layer, "reset_before") == "true":
                    raise ValueError("layer %r: reset_before has no PyTorch "
                                     "equivalent" % name)
                module = nn.GRU(in_width, size, batch_first=True)
                gates = 3
            else:
                module = nn.LSTM(in_width, size, batch_first=True)
                gates = 4
            with torch.no_grad():
                module.weight_ih_l0.copy_(_array(arrays, key, (gates * size, in_width)))
                module.weight_hh_l0.copy_(_array(arrays, name + ".weight_hh",
                                                 (gates * size, size)))
                module.bias_ih_l0.copy_(_array(arrays, name + ".bias_ih", (gates * size,)))
                module.bias_hh_l0.copy_(_array(arrays, name + ".bias_hh", (gates * size,)))
            width = size
        else:
            raise ValueError("layer %r: unsupported type %r" % (name, ltype))
        modules.append(module)

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
