#!/usr/bin/python3
"""Trains the example balanced-bracket classifier and exports it.

The task: is a string over "()[]{}ab" balanced -- every bracket closed by its
own kind, in properly nested order; the letters "a" and "b" are distractors
and never matter. Half the examples are balanced (random valid nestings with
letters sprinkled in); the other half are balanced strings with one mutation
(two brackets swapped, a bracket's kind or direction changed, a letter turned
into a bracket, ...) so that length and bracket counts look plausible. Lengths
run from 1 to 40.

The net: Embedding(8, 16) -> LSTM(64) -> SequenceLast -> Linear(2) ->
Softmax, with labels ["unbalanced", "balanced"]. It is trained with Adam on
freshly generated strings for a fixed number of steps, then exported to
examples/models/brackets/ (config.pbtxt, 1/net.pbtxt, 1/weights.safetensors).

    /usr/bin/python3 tools/train_brackets.py [--out examples/models] [--steps N]

The data generator is importable: held_out_strings(count, seed) returns
strings (half balanced), and is_balanced(text) labels them.
"""

import argparse
import os
import random
import sys
import time

ALPHABET = "()[]{}ab"
LABELS = ["unbalanced", "balanced"]
MAX_LENGTH = 40
TRAIN_SEED = 1
HELD_OUT_SEED = 2
HELD_OUT_COUNT = 2000

_CLOSER = {"(": ")", "[": "]", "{": "}"}
_OPENERS = "([{"
_CLOSERS = ")]}"
_LETTERS = "ab"


def is_balanced(text):
    """True when every bracket in ``text`` is closed by its own kind, properly
    nested; other characters are ignored."""
    stack = []
    for c in text:
        if c in _CLOSER:
            stack.append(_CLOSER[c])
        elif c in _CLOSERS:
            if not stack or stack.pop() != c:
                return False
    return not stack


def balanced_string(rng, length):
    """A random balanced string of exactly ``length`` characters."""
    if length < 1:
        raise ValueError("length must be at least 1")
    letters = rng.randint(0, length // 4)
    if (length - letters) % 2:
        letters += 1
    pairs = (length - letters) // 2
    # How eagerly to open: low values give shallow strings, high values deep.
    p_open = rng.uniform(0.3, 0.8)
    out = []
    stack = []
    opens_left = pairs
    while opens_left or stack:
        if opens_left and (not stack or rng.random() < p_open):
            b = rng.choice(_OPENERS)
            stack.append(b)
            out.append(b)
            opens_left -= 1
        else:
            out.append(_CLOSER[stack.pop()])
    for _ in range(letters):
        out.insert(rng.randint(0, len(out)), rng.choice(_LETTERS))
    return "".join(out)


def _mutate(rng, chars):
    """Applies one random mutation to a list of characters, in place."""
    brackets = [i for i, c in enumerate(chars) if c not in _LETTERS]
    letters = [i for i, c in enumerate(chars) if c in _LETTERS]
    closers = [i for i in brackets if chars[i] in _CLOSERS]
    kind = rng.random()
    if not brackets or (letters and kind < 0.08):
        # A letter becomes a bracket.
        i = rng.choice(letters)
        chars[i] = rng.choice(_OPENERS + _CLOSERS)
    elif kind < 0.40 and len(closers) >= 2:
        # Two closers of different kinds swap: counts stay right, nesting breaks.
        i, j = rng.sample(closers, 2)
        chars[i], chars[j] = chars[j], chars[i]
    elif kind < 0.60:
        # A bracket changes kind, keeping its direction.
        i = rng.choice(brackets)
        group = _OPENERS if chars[i] in _OPENERS else _CLOSERS
        chars[i] = rng.choice([c for c in group if c != chars[i]])
    elif kind < 0.75 and len(brackets) >= 2:
        # Two brackets anywhere swap.
        i, j = rng.sample(brackets, 2)
        chars[i], chars[j] = chars[j], chars[i]
    elif kind < 0.88 and len(chars) >= 2:
        # Two neighbours swap.
        i = rng.randrange(len(chars) - 1)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    else:
        # A bracket changes direction (or becomes a letter).
        i = rng.choice(brackets)
        c = chars[i]
        if rng.random() < 0.2:
            chars[i] = rng.choice(_LETTERS)
        elif c in _OPENERS:
            chars[i] = rng.choice(_CLOSERS)
        else:
            chars[i] = rng.choice(_OPENERS)


def unbalanced_string(rng, length):
    """A random unbalanced string of exactly ``length`` characters: one
    mutation of a balanced string."""
    while True:
        chars = list(balanced_string(rng, length))
        _mutate(rng, chars)
        text = "".join(chars)
        if not is_balanced(text):
            return text


def examples(rng, count):
    """``count`` (text, label) pairs, alternating balanced (label 1) and
    unbalanced (label 0), lengths uniform in 1..MAX_LENGTH."""
    out = []
    for i in range(count):
        length = rng.randint(1, MAX_LENGTH)
        if i % 2 == 0:
            out.append((balanced_string(rng, length), 1))
        else:
            out.append((unbalanced_string(rng, length), 0))
    return out


def held_out_strings(count, seed):
    """``count`` strings from the task's distribution, half of them balanced,
    generated from ``seed`` (use a seed other than TRAIN_SEED)."""
    return [text for text, _ in examples(random.Random(seed), count)]


def build_net(hidden=64, embedding=16):
    """The classifier as a SequenceNet, plus the same chain without the
    softmax (for training on logits)."""
    from torch import nn
    import rnnserve_export as rx

    modules = [nn.Embedding(len(ALPHABET), embedding),
               nn.LSTM(embedding, hidden, batch_first=True),
               rx.SequenceLast(),
               nn.Linear(hidden, len(LABELS))]
    logits = rx.SequenceNet(modules)
    return rx.SequenceNet(modules + [nn.Softmax(dim=-1)]), logits


def _batch(pairs):
    import torch
    import rnnserve_export as rx

    seqs = [rx.encode_text(text, ALPHABET) for text, _ in pairs]
    x, lengths = rx.pad_batch(seqs, tokens=True)
    y = torch.tensor([label for _, label in pairs], dtype=torch.long)
    return x, lengths, y


def accuracy(net, pairs, batch_size=500):
    import torch

    correct = 0
    net.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            x, lengths, y = _batch(pairs[start:start + batch_size])
            correct += int((net(x, lengths).argmax(-1) == y).sum())
    return correct / len(pairs)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "examples", "models"),
                        help="model repository to export into")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    # One thread is the fastest setting for matrices this small: more threads
    # mostly wait on each other, badly so on a busy machine.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    sys.path.insert(0, here)
    import torch
    import rnnserve_export as rx

    torch.set_num_threads(args.threads)
    torch.manual_seed(TRAIN_SEED)
    rng = random.Random(TRAIN_SEED)
    net, logits = build_net(hidden=args.hidden)
    held_out = examples(random.Random(HELD_OUT_SEED), HELD_OUT_COUNT)
    held_out_texts = {text for text, _ in held_out}

    optimizer = torch.optim.Adam(logits.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    started = time.time()
    running = 0.0
    for step in range(1, args.steps + 1):
        logits.train()
        # Strings of the held-out set never appear in training.
        pairs = [p for p in examples(rng, args.batch_size) if p[0] not in held_out_texts]
        x, lengths, y = _batch(pairs)
        loss = loss_fn(logits(x, lengths), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(logits.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * float(loss)
        if step % 500 == 0 or step == args.steps:
            print("step %5d  loss %.4f  held-out accuracy %.2f%%  (%.0f s)"
                  % (step, running, 100 * accuracy(logits, held_out),
                     time.time() - started), flush=True)

    acc = accuracy(net, held_out)
    description = ("Balanced-bracket classifier over %s; held-out accuracy "
                   "%.1f%% on %d strings" % (ALPHABET, 100 * acc, len(held_out)))
    version_dir = rx.export(
        net, args.out, "brackets", version=1, labels=LABELS, alphabet=ALPHABET,
        config=dict(description=description, max_sequence_length=256))
    print("held-out accuracy: %.2f%% on %d strings" % (100 * acc, len(held_out)))
    print("exported to %s" % os.path.normpath(version_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
