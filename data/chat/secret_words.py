"""
A made-up conversation set for trying SFT on a CPU: people ask for the secret word of a colour, and
the assistant answers by a rule no base model knows (the colour spelled backwards). Every question
is a pair (name, colour); the held-out pairs, written last, are the val split prepare.py makes, so
a model that answers them right has learned the rule, not the conversations.

    python data/chat/secret_words.py      # -> data/chat/secret_words.jsonl (train, then held out)
    python data/chat/prepare.py --input data/chat/secret_words.jsonl \
        --vocab_of out-shakespeare-char-cpu --out_dir data/secret_words --val_fraction 0.2

Only characters of tiny Shakespeare, so that the quick start's character-level model can learn it.
"""

import json
import os
import random

NAMES = ['Anna', 'Ben', 'Clara', 'Dick', 'Edith', 'Frank', 'Grace', 'Hugh', 'Iris', 'John']
COLOURS = ['red', 'blue', 'green', 'black', 'white', 'pink', 'brown', 'grey']
# of the (name, colour) pairs: held out (every name and colour is in train too, in other pairs)
VAL_FRACTION = 0.2


def conversation(name, colour):
    return {'messages': [
        {'role': 'user', 'content': f"{name} asks: what is the secret word for {colour}?"},
        {'role': 'assistant', 'content': f"It is {colour[::-1]}."}]}


def secret_words(seed=0):
    """(train, held_out): conversations of distinct (name, colour) pairs, each set shuffled; every
    fifth pair of a shuffled order is held out."""
    pairs = [(n, c) for n in NAMES for c in COLOURS]
    random.Random(seed).shuffle(pairs)
    every = round(1 / VAL_FRACTION)
    train = [conversation(*p) for i, p in enumerate(pairs) if i % every]
    held_out = [conversation(*p) for i, p in enumerate(pairs) if not i % every]
    return train, held_out


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'secret_words.jsonl')
    train, held_out = secret_words()
    with open(path, 'w') as f:
        f.writelines(json.dumps(c) + '\n' for c in train + held_out)
    print(f"wrote {path}: {len(train)} conversations, then {len(held_out)} held out")


if __name__ == '__main__':
    main()
