#!/usr/bin/python3
"""Trains the example run tagger and exports it.

The task: split a string into runs of one character class -- letters,
digits, punctuation, spaces -- and tag every character with its place in its
run: B (begins a run of two or more), I (inside one), E (ends one) or S (a
run of its own). A character's tag depends on both neighbours, so it takes
the left and the right context at once:

    text  "ab12 ,x"
    tags   B E B E S S S

Strings are random mixtures of runs (lengths 1 to 6, mostly short) over the
alphabet below, 1 to 48 characters long.

The net: Embedding(V, 16) -> LSTM(32, bidirectional) -> Map(Linear(32) ->
Tanh -> Linear(4) -> Softmax): a class distribution per character, with
labels ["B", "I", "E", "S"]. It is trained with Adam on freshly generated
strings for a fixed number of steps, then exported to
examples/models/tagger/ (config.pbtxt, 1/net.pbtxt, 1/weights.safetensors).

    /usr/bin/python3 tools/train_tagger.py [--out examples/models] [--steps N]

The data generator is importable: held_out_strings(count, seed) returns
strings, tags(text) their tag labels.
"""

import argparse
import os
import random
import sys
import time

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS = "0123456789"
PUNCTUATION = ".,;:!?-'\"()/"
SPACES = " "
ALPHABET = LETTERS + DIGITS + PUNCTUATION + SPACES
LABELS = ["B", "I", "E", "S"]
MAX_LENGTH = 48
TRAIN_SEED = 1
HELD_OUT_SEED = 2
HELD_OUT_COUNT = 2000

_CLASSES = (LETTERS, DIGITS, PUNCTUATION, SPACES)
_CLASS_OF = {c: k for k, chars in enumerate(_CLASSES) for c in chars}
# How often each class starts a run, and the run lengths drawn.
_CLASS_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
_RUN_LENGTHS = (1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6)


def char_class(c):
    """0 letter, 1 digit, 2 punctuation, 3 space."""
    return _CLASS_OF[c]


def tags(text):
    """The tag label of every character of ``text``."""
    classes = [char_class(c) for c in text]
    out = []
    for i, k in enumerate(classes):
        same_before = i > 0 and classes[i - 1] == k
        same_after = i + 1 < len(classes) and classes[i + 1] == k
        if same_before:
            out.append("I" if same_after else "E")
        else:
            out.append("B" if same_after else "S")
    return out


def random_string(rng, length):
    """A random string of exactly ``length`` characters made of runs."""
    if length < 1:
        raise ValueError("length must be at least 1")
    out = []
    while len(out) < length:
        chars = rng.choices(_CLASSES, weights=_CLASS_WEIGHTS)[0]
        run = rng.choice(_RUN_LENGTHS)
        out.extend(rng.choice(chars) for _ in range(run))
    return "".join(out[:length])


def strings(rng, count):
    """``count`` strings, lengths uniform in 1..MAX_LENGTH."""
    return [random_string(rng, rng.randint(1, MAX_LENGTH)) for _ in range(count)]


def held_out_strings(count, seed):
    """``count`` strings from the task's distribution, generated from
    ``seed`` (use a seed other than TRAIN_SEED)."""
    return strings(random.Random(seed), count)


def build_net(hidden=32, embedding=16, inner=32):
    """The tagger as a SequenceNet, plus the same chain with a Map that
    stops before the softmax (for training on logits)."""
    from torch import nn
    import rnnserve_export as rx

    embed = nn.Embedding(len(ALPHABET), embedding)
    lstm = nn.LSTM(embedding, hidden, bidirectional=True, batch_first=True)
    head = [nn.Linear(2 * hidden, inner), nn.Tanh(), nn.Linear(inner, len(LABELS))]
    net = rx.SequenceNet([embed, lstm, rx.Map(head + [nn.Softmax(dim=-1)])])
    logits = rx.SequenceNet([embed, lstm, rx.Map(head)])
    return net, logits


def _batch(texts):
    import torch
    import rnnserve_export as rx

    seqs = [rx.encode_text(text, ALPHABET) for text in texts]
    x, lengths = rx.pad_batch(seqs, tokens=True)
    y = torch.full(x.shape, -100, dtype=torch.long)  # ignored past the end
    for i, text in enumerate(texts):
        y[i, :len(text)] = torch.tensor([LABELS.index(t) for t in tags(text)])
    return x, lengths, y


def accuracy(net, texts, batch_size=500):
    """(per-character accuracy, whole-string accuracy) of a net's argmax."""
    import torch

    chars = correct_chars = correct_strings = 0
    net.eval()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            x, lengths, y = _batch(texts[start:start + batch_size])
            guess = net(x, lengths).argmax(-1)
            for i, n in enumerate(lengths.tolist()):
                right = int((guess[i, :n] == y[i, :n]).sum())
                chars += n
                correct_chars += right
                correct_strings += right == n
    return correct_chars / chars, correct_strings / len(texts)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "examples", "models"),
                        help="model repository to export into")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    # One thread is the fastest setting for matrices this small.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    sys.path.insert(0, here)
    import torch
    import rnnserve_export as rx

    torch.set_num_threads(args.threads)
    torch.manual_seed(TRAIN_SEED)
    rng = random.Random(TRAIN_SEED)
    net, logits = build_net(hidden=args.hidden)
    held_out = held_out_strings(HELD_OUT_COUNT, HELD_OUT_SEED)
    held_out_set = set(held_out)

    optimizer = torch.optim.Adam(logits.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-2, total_steps=args.steps, pct_start=0.1)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    started = time.time()
    running = 0.0
    for step in range(1, args.steps + 1):
        logits.train()
        # Strings of the held-out set never appear in training.
        texts = [t for t in strings(rng, args.batch_size) if t not in held_out_set]
        x, lengths, y = _batch(texts)
        out = logits(x, lengths)
        loss = loss_fn(out.reshape(-1, out.shape[-1]), y[:, :out.shape[1]].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(logits.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * float(loss)
        if step % 250 == 0 or step == args.steps:
            per_char, per_string = accuracy(logits, held_out)
            print("step %5d  loss %.4f  held-out accuracy %.2f%% per character, "
                  "%.2f%% per string  (%.0f s)"
                  % (step, running, 100 * per_char, 100 * per_string,
                     time.time() - started), flush=True)

    per_char, per_string = accuracy(net, held_out)
    description = ("Run tagger: tags each character B, I, E or S by its place in "
                   "its run of letters, digits, punctuation or spaces; held-out "
                   "accuracy %.2f%% per character, %.2f%% per string on %d strings"
                   % (100 * per_char, 100 * per_string, len(held_out)))
    version_dir = rx.export(
        net, args.out, "tagger", version=1, labels=LABELS, alphabet=ALPHABET,
        config=dict(description=description, max_sequence_length=256))
    print("held-out accuracy: %.2f%% per character, %.2f%% per string on %d strings"
          % (100 * per_char, 100 * per_string, len(held_out)))
    print("exported to %s" % os.path.normpath(version_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
