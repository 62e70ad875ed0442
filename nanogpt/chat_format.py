"""
The chat format: a conversation as token ids and back, in one place for data/chat/prepare.py,
train.py (through the data's mask), sample.py, chat.py and serve.py.

A conversation is a list of messages, {'role': 'system' | 'user' | 'assistant', 'content': str}, as
OpenAI's API and most chat datasets have them. Each message becomes its role's special token, its
content's ordinary tokens and the end token:

    <|system|>You are terse.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|><|user|>...

The four special tokens are part of the vocabulary spec ("special", see tokenizer.py), so a
checkpoint carries its chat format and everything that loads it knows how to talk to it. Content is
encoded with specials disallowed: no text a user types can forge a turn. No newlines or "User:"
labels are added: the turn tokens say all of it, and cost one token each.

What a model learns from (the mask render returns): the tokens of the assistant's content and the
assistant's end token, which teaches it to stop. The role tokens and everyone else's turns are
context only. To answer, the model is given the conversation so far plus <|assistant|> (prompt) and
generates until it samples <|end|> (stop_token).
"""

from nanogpt.errors import UserError

SYSTEM, USER, ASSISTANT, END = '<|system|>', '<|user|>', '<|assistant|>', '<|end|>'
SPECIAL = [SYSTEM, USER, ASSISTANT, END]  # their order fixes their ids: 50257.. for GPT-2's BPE
ROLES = {'system': SYSTEM, 'user': USER, 'assistant': ASSISTANT}


def chat_vocab(spec):
    """The vocabulary spec of spec plus the chat format's special tokens, appended after its ids."""
    return {**spec, 'special': SPECIAL}


def has_chat_format(tokenizer):
    return all(s in tokenizer.special for s in SPECIAL)


def check_conversation(messages):
    """A UserError saying what is wrong with a conversation, if anything."""
    if not isinstance(messages, list) or not messages:
        raise UserError("the conversation is empty: 'messages' must be a list of messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get('role') not in ROLES:
            role = m.get('role') if isinstance(m, dict) else m
            raise UserError(f"message {k} has role {role!r}: expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(m.get('content'), str):
            raise UserError(f"message {k} ({m['role']}) has no text content")


def check_training_conversation(messages):
    """A UserError if a conversation to learn from (SFT) would teach nothing or the wrong thing:
    the assistant speaking before any user (it would learn to answer no one), or no assistant
    message with text (only the bare end token would be learnt: to say nothing)."""
    check_conversation(messages)
    roles = [m['role'] for m in messages if m['role'] != 'system']
    if 'assistant' in roles and roles.index('assistant') < (roles + ['user']).index('user'):
        raise UserError("an assistant message comes before any user message: put the user's "
                        "first")
    if not any(m['role'] == 'assistant' and m['content'].strip() for m in messages):
        raise UserError("no assistant message with text: nothing to learn from it")


def render(tokenizer, messages):
    """The conversation's token ids and its mask, a 0/1 list as long: 1 where the token is one
    the model learns to say (the assistant's content and end tokens)."""
    check_conversation(messages)
    ids, mask = [], []
    for m in messages:
        content = tokenizer.encode(m['content'], allow_special=False)
        said = int(m['role'] == 'assistant')
        ids += [tokenizer.special[ROLES[m['role']]], *content, tokenizer.special[END]]
        mask += [0] + [said] * len(content) + [said]
    return ids, mask


def prompt(tokenizer, messages, max_tokens=None):
    """The ids that ask the model for the next assistant message: the conversation so far and the
    assistant's opening token. Generation stops at stop_token(tokenizer).
    max_tokens: the most ids the prompt may have (the model's context): the oldest messages are
    left out, whole, until it fits, but for a system message that opens the conversation and the
    latest message, which always stay."""
    check_conversation(messages)
    turns = [render(tokenizer, [m])[0] for m in messages]  # a conversation's ids: its turns' ids
    head = int(messages[0]['role'] == 'system')
    first = head  # the oldest message kept after the system message
    while (max_tokens and first < len(turns) - 1
           and sum(map(len, turns[:head] + turns[first:])) + 1 > max_tokens):
        first += 1
    return [i for turn in turns[:head] + turns[first:] for i in turn] + [
        tokenizer.special[ASSISTANT]]


def stop_token(tokenizer):
    return tokenizer.special[END]


def parse(tokenizer, ids):
    """The messages of a rendered conversation (render's inverse); a ValueError if ids are not
    one."""
    role_of = {tokenizer.special[t]: role for role, t in ROLES.items()}
    end, messages, i = tokenizer.special[END], [], 0
    while i < len(ids):
        if ids[i] not in role_of:
            raise ValueError(f"token {i} (id {ids[i]}) does not open a turn")
        j = next((j for j in range(i + 1, len(ids)) if ids[j] in tokenizer.special_names), None)
        if j is None or ids[j] != end:
            raise ValueError(f"the turn opened at token {i} does not end with {END}")
        messages.append({'role': role_of[ids[i]], 'content': tokenizer.decode(ids[i + 1:j])})
        i = j + 1
    return messages
