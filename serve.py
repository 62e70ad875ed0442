r"""
Serve a model over OpenAI's API, for the clients people already use (the `openai` package,
lm-evaluation-harness's local-completions, chat front-ends, curl), and a playground page at /.

    python serve.py --out_dir=out-shakespeare-char   # then open http://127.0.0.1:8000
    python serve.py --init_from=gpt2 --host=0.0.0.0 --port=8080
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "out-shakespeare-char", "prompt": "ROMEO:", "max_tokens": 50}'

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /.
Requests are decoded together by engine.py (continuous batching): docs/serving.md has the API, the
chat template, the design and the measurements. Needs `pip install -e .[serve]`.
"""

import asyncio
import json
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from configurator import cli
from nanogpt import chat_format
from nanogpt.checkpoint import load_model
from nanogpt.device import resolve_decode_compile, setup
from nanogpt.engine import Engine, Row
from nanogpt.errors import UserError
from nanogpt.generation import check_keep

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ImportError:
    raise SystemExit("serve.py needs FastAPI and uvicorn: pip install -e .[serve]") from None

PLAYGROUND = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nanogpt', 'playground.html')


@dataclass
class ServeConfig:
    # 'resume' (out_dir/ckpt), or OpenAI's 'gpt2' ... 'gpt2-xl' or a local HF GPT-2 folder
    init_from: str = 'resume'
    out_dir: str = 'out'  # the training run's folder
    ckpt: str = 'best.pt'
    host: str = '127.0.0.1'  # 0.0.0.0 serves other machines too: there is no authentication
    port: int = 8000  # 0: any free port (the one taken is printed)
    model_name: str = ''  # the `model` clients ask for; '' names it after out_dir or init_from
    max_rows: int = 32  # rows decoded together at most; more wait for a free row
    max_n: int = 16  # the most rows (n times the prompts) one request may ask for
    max_tokens: int = 2048  # the most new tokens a request may ask for
    max_prompt_tokens: int | None = None  # longest prompt; None: block_size (echo: block_size)
    keep: int | None = None  # tokens of context kept when a row's cache fills; None: block_size//2
    device: str = 'auto'
    # 'auto': sample.py's rule for a batch of max_rows rows (bf16 on GPUs, fp32 on most CPUs)
    dtype: str = 'auto'
    # compile the engine's decode step (generation.compile_decode), once per bucket of rows at
    # start (progress printed; requests wait for it); 'auto': on CUDA (resolve_decode_compile)
    compile: bool | str = 'auto'


def check_config(cfg):
    """Refuse, before a model is loaded, every setting that could not serve a request."""
    for key in ('max_rows', 'max_n', 'max_tokens', 'max_prompt_tokens', 'keep'):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UserError(f"{key} must be at least 1, got {value}")
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"port must be in 0..65535 (0: any free one), got {cfg.port}")


def listen(host, port):
    """A socket bound to host:port, taken before the model loads: a busy port or an unknown host
    is one line at start, not a traceback after a minute of loading."""
    try:
        family, kind, proto, _, _ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto from getaddrinfo (IPPROTO_TCP, not 0): asyncio turns Nagle off (TCP_NODELAY) only
        # on sockets that say so; with Nagle on, a streamed token waits up to 40 ms for the
        # client's delayed ACK of the one before (the first token of every keep-alive request)
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:  # also socket.gaierror (an unknown host)
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): give another "
                        "--port or --host") from None
    return sock


# The chat template of a base model, which has no chat format of its own: the messages become plain
# text, one "Role: content" line each, and the model continues after "Assistant:"; generation stops
# where it would start the user's next turn. A model finetuned on conversations has its chat format
# in its vocabulary (chat_format.py), and that is used instead.
CHAT_ROLES = {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'}
CHAT_STOP = '\nUser:'


def chat_prompt(messages):
    lines = [f"{CHAT_ROLES[m.role]}: {m.text()}" for m in messages]
    return '\n'.join(lines + ['Assistant:'])


# ---- the API's requests, as OpenAI defines them -------------------------------------------------

class Sampling(BaseModel):
    # other OpenAI fields (user, presence_penalty, ...) are accepted and ignored
    model_config = ConfigDict(extra='ignore')
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # an extension: sample among the k most likely tokens
    stop: str | list[str] | None = None  # at most 4, as OpenAI's
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # OpenAI's: a 64-bit integer
    stream: bool = False


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class TextPart(BaseModel):  # a content part; images and audio are not for a text model
    model_config = ConfigDict(extra='ignore')
    type: Literal['text']
    text: str


class Message(BaseModel):
    role: Literal['system', 'developer', 'user', 'assistant']
    content: str | list[TextPart]

    def text(self):  # content parts, joined
        if isinstance(self.content, str):
            return self.content
        return ''.join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens


# ---- the one error path: every failure is an answer in OpenAI's shape --------------------------

class APIError(Exception):
    """An error answer: the client's mistake (400, invalid_request_error, naming the param at fault)
    or the server's own failure (500, server_error)."""

    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def body(self):
        kind = 'server_error' if self.status >= 500 else 'invalid_request_error'
        return {'error': {'message': self.message, 'type': kind, 'param': self.param,
                          'code': None}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


def validation_error(e):
    """A RequestValidationError as an APIError naming the field. Of a union's errors (one per
    member: `prompt` may be a string or lists) the deepest says most; the members' tags in the
    path ('str', 'list[int]') are left out."""
    err = max(e.errors(), key=lambda err: len(err['loc']))
    if err['type'] == 'json_invalid':
        return APIError(f"the request body is not valid JSON: {err['ctx']['error']}")
    loc = '.'.join(str(x) for x in err['loc'][1:]  # after 'body'
                   if not (isinstance(x, str) and (x in ('str', 'int') or '[' in x)))
    return APIError(f"{loc or 'body'}: {err['msg']}", loc or None)


def add_error_handlers(app):
    @app.exception_handler(APIError)
    async def api_error(request, e):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        return validation_error(e).response()

    @app.exception_handler(HTTPException)  # FastAPI's and Starlette's own: 404, 405, a bad body
    async def http_error(request, e):
        hint = ' (send UTF-8 JSON)' if e.status_code == 400 else ''
        return APIError(f"{e.detail}{hint}", status=e.status_code).response()

    @app.exception_handler(Exception)  # a bug: still OpenAI's shape; uvicorn logs the traceback
    async def server_error(request, e):
        return APIError(f"internal error: {type(e).__name__}: {e}", status=500).response()


# ---- from the engine's events to an answer, streamed or collected ------------------------------

DISCONNECT_CHECK = 0.5  # seconds between asking whether a client is still there


async def events(engine, rows, request):
    """(choice index, event) from the engine until every row has finished; rows whose client has
    gone are cancelled, which frees them at the engine's next step. The client is asked for every
    DISCONNECT_CHECK seconds whether events arrive or not (a decoding row sends one every step)."""
    loop, q = asyncio.get_running_loop(), asyncio.Queue()
    for i, row in enumerate(rows):
        row.emit = lambda event, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, event))
    engine.submit(rows)
    left, checked = len(rows), loop.time()
    try:
        while left:
            try:
                i, event = await asyncio.wait_for(q.get(), timeout=DISCONNECT_CHECK)
            except asyncio.TimeoutError:
                event = None
            if loop.time() - checked >= DISCONNECT_CHECK:
                if await request.is_disconnected():
                    return
                checked = loop.time()
            if event is not None:
                left -= event['finish_reason'] is not None
                yield i, event
    finally:
        for row in rows:
            row.cancelled = True  # nothing for rows already done


def sse(obj):  # one server-sent event
    return f"data: {json.dumps(obj)}\n\n"


async def answer(engine, rows, request, stream, chunk, body, opening=()):
    """The one path from rows to a response. stream: the objects of `opening`, then chunk(i, event)
    for each event (None: nothing to send), as server-sent events; else body(events) once every
    row has finished. A failure inside generation is a 500 server_error: the whole response while
    nothing has been sent, else the stream's last event (OpenAI's clients raise it)."""
    evs = events(engine, rows, request)
    if not stream:
        got = [ev async for ev in evs]
        failed = next((ev['error'] for _, ev in got if 'error' in ev), None)
        if failed:
            raise APIError(failed, status=500)
        return body(got)
    try:
        first = await evs.__anext__()
    except StopAsyncIteration:  # the client left before the first token
        return Response(status_code=204)
    if 'error' in first[1]:
        await evs.aclose()
        raise APIError(first[1]['error'], status=500)

    async def server_sent_events():
        try:
            for obj in opening:
                yield sse(obj)
            async for i, ev in chained(first, evs):
                if 'error' in ev:
                    yield sse(APIError(ev['error'], status=500).body())
                    return
                obj = chunk(i, ev)
                if obj is not None:
                    yield sse(obj)
            yield 'data: [DONE]\n\n'
        finally:
            await evs.aclose()
    return StreamingResponse(server_sent_events(), media_type='text/event-stream')


async def chained(first, rest):
    """first, then what the async iterator rest yields."""
    yield first
    async for item in rest:
        yield item


def collect(rows, got):
    """Per row of a request: its new text, its (id, logprob, top) tokens (the echo's first), and
    its finish reason, from the events it got."""
    texts, tokens, finish = [''] * len(rows), [[] for _ in rows], [None] * len(rows)
    for i, ev in got:
        if 'echo' in ev:
            tokens[i] += ev['echo']
            continue
        texts[i] += ev['text']
        tokens[i].append((ev['token'], ev.get('logprob'), ev.get('top')))
        finish[i] = ev['finish_reason']
    return texts, tokens, finish


def logprobs_of(tokenizer, tokens, offset):
    """OpenAI's logprobs object from (id, logprob, top) triples."""
    out = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': []}
    for token, lp, top in tokens:
        text = tokenizer.decode([token])
        out['tokens'].append(text)
        out['token_logprobs'].append(lp)
        out['top_logprobs'].append(None if top is None else
                                   {tokenizer.decode([t]): v for t, v in top.items()})
        out['text_offset'].append(offset)
        offset += len(text)
    return out


def usage(rows):
    # each prompt once, however many rows (n) it has
    prompt = sum(len(p) for p in {id(r.prompt): r.prompt for r in rows}.values())
    completion = sum(len(r.tokens) - len(r.prompt) for r in rows)
    return {'prompt_tokens': prompt, 'completion_tokens': completion,
            'total_tokens': prompt + completion}


# ---- the routes --------------------------------------------------------------------------------

class Server:
    """What the routes share: the tokenizer, the engine, the model's name and the limits."""

    def __init__(self, cfg, tokenizer, engine, model_id, block_size):
        self.cfg, self.tokenizer, self.engine, self.model_id = cfg, tokenizer, engine, model_id
        self.block_size = block_size
        self.max_prompt = cfg.max_prompt_tokens or block_size

    def encode(self, prompt, param='prompt'):
        """A prompt's token ids, checked: text or ids, in the vocabulary, not empty or too long."""
        vocab_size = self.tokenizer.vocab_size
        if isinstance(prompt, list):  # token ids
            bad = [t for t in prompt if not 0 <= t < vocab_size]
            if bad:
                raise APIError(f"token id {bad[0]} is outside the vocabulary "
                               f"(0..{vocab_size - 1})", param)
            ids = prompt
        else:
            try:
                ids = self.tokenizer.encode(prompt)
            except UserError as e:
                raise APIError(str(e), param) from None
        if not ids:
            raise APIError("the prompt is empty: give it at least one token", param)
        if len(ids) > self.max_prompt:
            raise APIError(f"the prompt is {len(ids)} tokens, more than this server allows "
                           f"({self.max_prompt})", param)
        return ids

    def rows(self, req, prompts, max_tokens, logprobs=None, echo=False, own_stop=(),
             stop_token=None):
        """The rows of a request, checked: n per prompt, choice index = prompt * n + j. own_stop:
        the server's stop strings (the chat template's), on top of the client's four."""
        if req.model != self.model_id:
            raise APIError(f"model {req.model!r} is not served here: this server serves "
                           f"{self.model_id!r} (GET /v1/models)", 'model')
        if not 1 <= max_tokens <= self.cfg.max_tokens:
            raise APIError(f"max_tokens must be between 1 and {self.cfg.max_tokens}, got "
                           f"{max_tokens}", 'max_tokens')
        if req.n * len(prompts) > self.cfg.max_n:
            raise APIError(f"n ({req.n}) times the prompts ({len(prompts)}) is more than this "
                           f"server allows per request ({self.cfg.max_n})", 'n')
        stop = [req.stop] if isinstance(req.stop, str) else [s for s in req.stop or [] if s]
        if len(stop) > 4:
            raise APIError("stop takes at most 4 strings", 'stop')
        ids = [self.encode(p) for p in prompts]
        if echo and max(map(len, ids)) > self.block_size:
            raise APIError(f"echo needs the whole prompt in the model's context: at most "
                           f"{self.block_size} tokens", 'prompt')
        seed = random.randrange(2**31) if req.seed is None else req.seed
        # row_uniform reads a seed's low 32 bits: the same stream as sample.py's for that seed
        return [Row(p, max_tokens, None, temperature=req.temperature, top_k=req.top_k,
                    top_p=None if req.top_p >= 1.0 else req.top_p, seed=(seed + j) % 2**32,
                    stop=(*own_stop, *stop), stop_token=stop_token, logprobs=logprobs,
                    echo=echo) for p in ids for j in range(req.n)]

    async def completions(self, req: CompletionRequest, request: Request):
        prompts = ([req.prompt] if isinstance(req.prompt, str) or not req.prompt
                   or isinstance(req.prompt[0], int) else req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
        rows = self.rows(req, prompts, max_tokens, req.logprobs, req.echo,
                         stop_token=self.tokenizer.eot_token)
        head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion',
                'created': int(time.time()), 'model': self.model_id}
        wants_logprobs = req.logprobs is not None

        def chunk(i, ev):
            if 'echo' in ev:
                return None  # streamed with the first token's chunk
            lp = (logprobs_of(self.tokenizer, [(ev['token'], ev['logprob'], ev['top'])], 0)
                  if wants_logprobs else None)
            return {**head, 'choices': [{'index': i, 'text': ev['text'], 'logprobs': lp,
                                         'finish_reason': ev['finish_reason']}]}

        def body(got):
            texts, tokens, finish = collect(rows, got)
            choices = []
            for i, row in enumerate(rows):
                prompt = self.tokenizer.decode(row.prompt)
                lp = (logprobs_of(self.tokenizer, tokens[i], 0 if req.echo else len(prompt))
                      if wants_logprobs else None)
                choices.append({'index': i, 'text': (prompt if req.echo else '') + texts[i],
                                'finish_reason': finish[i], 'logprobs': lp})
            return {**head, 'choices': choices, 'usage': usage(rows)}
        return await answer(self.engine, rows, request, req.stream, chunk, body)

    async def chat(self, req: ChatRequest, request: Request):
        max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens) if m is not None),
                          256)  # a reply, not OpenAI's "until the context ends"
        if chat_format.has_chat_format(self.tokenizer):  # the model's own: it ends with <|end|>
            messages = [{'role': CHAT_ROLES[m.role].lower(), 'content': m.text()}
                        for m in req.messages]
            try:
                ids = chat_format.prompt(self.tokenizer, messages, self.max_prompt)  # latest turns
            except UserError as e:  # characters a character-level model has no tokens for
                raise APIError(str(e), 'messages') from None
            rows = self.rows(req, [ids], max_tokens,
                             stop_token=chat_format.stop_token(self.tokenizer))
        else:
            rows = self.rows(req, [chat_prompt(req.messages)], max_tokens, own_stop=[CHAT_STOP])
        head = {'id': f'chatcmpl-{uuid.uuid4().hex}', 'created': int(time.time()),
                'model': self.model_id}
        chunk_head = {**head, 'object': 'chat.completion.chunk'}
        opening = [{**chunk_head, 'choices': [{'index': i, 'finish_reason': None, 'delta':
                                               {'role': 'assistant', 'content': ''}}]}
                   for i in range(len(rows))]

        def chunk(i, ev):
            delta = {'content': ev['text']} if ev.get('text') else {}
            return {**chunk_head, 'choices': [{'index': i, 'delta': delta,
                                               'finish_reason': ev['finish_reason']}]}

        def body(got):
            texts, _, finish = collect(rows, got)
            choices = [{'index': i, 'finish_reason': finish[i],
                        'message': {'role': 'assistant', 'content': texts[i]}}
                       for i in range(len(rows))]
            return {**head, 'object': 'chat.completion', 'choices': choices,
                    'usage': usage(rows)}
        return await answer(self.engine, rows, request, req.stream, chunk, body, opening)

    def health(self):
        active, waiting = self.engine.load()
        return {'status': 'ok', 'rows': active, 'waiting': waiting}

    def models(self):
        return {'object': 'list', 'data': [{'id': self.model_id, 'object': 'model',
                                            'created': 0, 'owned_by': 'nanogpt'}]}


def create_app(cfg, tokenizer, engine, model_id, block_size):
    server = Server(cfg, tokenizer, engine, model_id, block_size)
    app = FastAPI(title='nanogpt')
    add_error_handlers(app)
    app.get('/health')(server.health)
    app.get('/v1/models')(server.models)
    app.get('/')(lambda: FileResponse(PLAYGROUND))
    app.post('/v1/completions')(server.completions)
    app.post('/v1/chat/completions')(server.chat)
    return app


def main(cfg):
    """Load the model, start the engine's thread and serve until interrupted."""
    check_config(cfg)
    sock = listen(cfg.host, cfg.port)
    dev = setup(cfg.device, cfg.dtype, sample_rows=cfg.max_rows)
    model, tokenizer, _ = load_model(cfg.init_from, cfg.out_dir, cfg.ckpt)
    model.to(dev.device)
    check_keep(cfg.keep, model.config.block_size)
    model_id = cfg.model_name or (os.path.basename(os.path.normpath(cfg.out_dir))
                                  if cfg.init_from == 'resume' else cfg.init_from)
    engine = Engine(model, tokenizer, cfg.max_rows, dev.autocast, cfg.keep,
                    compile=resolve_decode_compile(cfg.compile, dev.device))
    threading.Thread(target=engine.run, name='engine', daemon=True).start()
    app = create_app(cfg, tokenizer, engine, model_id, model.config.block_size)
    port = sock.getsockname()[1]
    print(f"serving {model_id!r} on {dev.device} ({dev.dtype}) at http://{cfg.host}:{port}",
          flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level='warning')).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()


if __name__ == '__main__':
    cli(main, ServeConfig)
