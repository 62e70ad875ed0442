"""
Configuration: defaults < config file < --key=value flags, applied left to right.

Each script declares its knobs as a dataclass of defaults and ends with `cli(main, Config)`:

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

A config file is plain Python run in its own namespace, seeded with the values so far (so a file can
say `lr_decay_iters = max_iters`); every public name it binds must be a known key.
A flag's value is a Python literal (`--lr=3e-4`, `--bias=False`); a bare word is taken as a string
only for string keys. An int may stand for a float, a bool never for an int. Mistakes are a one-line
error naming the key.
A config file is Python and runs as such, with your permissions: run only config files you trust.
"""

import ast
import dataclasses
import difflib
import os
import sys
import types
import typing

from nanogpt.errors import UserError


def _allowed_types(cls, key):
    hint = typing.get_type_hints(cls)[key]
    return (typing.get_args(hint)
            if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,))


def _check_type(cls, key, value):
    """Return value converted to the key's declared type, or raise UserError."""
    allowed = _allowed_types(cls, key)
    for t in allowed:
        if t is type(None) and value is None:
            return value
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = ' or '.join('None' if t is type(None) else t.__name__ for t in allowed)
    raise UserError(f"config key '{key}' must be {names}, got {type(value).__name__} {value!r}")


def _unknown_key(cls, key):
    keys = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(keys)})"
    return UserError(f"unknown config key '{key}'{hint}")


def _parse_flag_value(cls, key, text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if str in _allowed_types(cls, key):
            return text  # a bare word, e.g. --device=cpu
        raise UserError(f"config key '{key}': cannot parse value {text!r}") from None


def _line_in(error, path):
    """The line of the config file `path` where `error` was raised, from its traceback."""
    tb, line = error.__traceback__, None
    while tb:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def load_config(cls, args):
    """Build a `cls` dataclass from its defaults, then each arg in order: a config file path, or
    --key=value. Returns the config object; raises UserError on any mistake."""
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    for arg in args:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise UserError(f"config file '{arg}' not found (flags are written --key=value)")
            namespace = dict(values)
            try:
                with open(arg) as f:
                    code = compile(f.read(), arg, 'exec')
                exec(code, namespace)  # run the file in its own namespace, never in ours
            except Exception as e:  # a config file is Python: any error of its own is the file's
                line = getattr(e, 'lineno', None) or _line_in(e, arg)
                raise UserError(f"config file {arg}" + (f", line {line}" if line else '')
                                + f": {type(e).__name__}: {e}") from None
            for key, value in namespace.items():
                if key.startswith('_') or isinstance(value, types.ModuleType):
                    continue  # __builtins__, imports and private helpers are not config
                if key not in values:
                    raise UserError(f"in {arg}: " + str(_unknown_key(cls, key)))
                values[key] = _check_type(cls, key, value)
        else:
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise UserError(f"flag '{arg}' must be written --key=value")
            if key not in values:
                raise _unknown_key(cls, key)
            try:
                values[key] = _check_type(cls, key, _parse_flag_value(cls, key, text))
            except UserError:
                if str not in _allowed_types(cls, key):
                    raise
                values[key] = text  # e.g. --clients=8 or --out_dir=2024 for a string key
    return cls(**values)


def field_comments(cls):
    """{field: its comment} from the dataclass's source: the comment on the field's line, else the
    comment lines just above it (where a long one goes)."""
    import inspect
    comments, above = {}, []
    lines = [line for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c)  # inherited too
             for line in inspect.getsource(c).splitlines()[1:]]
    for line in lines:
        if line.strip().startswith('#'):
            above.append(line.strip().lstrip('# '))
            continue
        code, _, comment = line.partition('  # ')
        code = code.strip()
        if ':' in code and code.split(':')[0].isidentifier():
            comments[code.split(':')[0]] = comment.strip() or ' '.join(above)
            above = []
        else:
            above = []
    return comments


def usage(cls, doc):
    """What --help prints: the script's docstring (its commands), then every key, its default
    and its comment."""
    comments = field_comments(cls)
    lines = [(doc or '').strip(), '', 'keys (--key=value; defaults < config file < flags):']
    for f in dataclasses.fields(cls):
        lines.append(f"  --{f.name}={f.default!r}" + (f"  {comments[f.name]}"
                                                     if comments.get(f.name) else ''))
    return '\n'.join(lines)


def print_config(cfg):
    print('config: ' + ', '.join(f'{k}={v!r}' for k, v in dataclasses.asdict(cfg).items()))


def cli(main, cls=None, argv=None):
    """Entry point of every script: parse argv into a `cls` config, run main(cfg), and turn a
    UserError into one line on stderr and exit status 2; --help (or -h) prints usage() and exits.
    Without cls, main() parses its own args."""
    argv = sys.argv[1:] if argv is None else argv
    if cls is not None and any(a in ('-h', '--help') for a in argv):
        print(usage(cls, sys.modules[main.__module__].__doc__))
        sys.exit(0)
    try:
        if cls is None:
            return main()
        cfg = load_config(cls, argv)
        return main(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
