r"""
Serve a model over OpenAI's API, for the clients people already use (the `openai` package,
lm-evaluation-harness's local-completions, chat front-ends, curl), and a playground page at /.

    python serve.py --out_dir=out-shakespeare-char   # then open http://127.0.0.1:8000
    python serve.py --init_from=gpt2 --host=0.0.0.0 --port=8080
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "out-shakespeare-char", "prompt": "ROMEO:", "max_tokens": 50}'

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /.
Requests are decoded together by engine.py (continuous batching): docs/serving.md has the API, the
chat template, the design and the measurements. Needs `pip install fastapi uvicorn`.
"""

import asyncio
import json
import os
import random
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
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError:
    raise SystemExit("serve.py needs FastAPI and uvicorn: pip install fastapi uvicorn") from None

PLAYGROUND = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nanogpt', 'playground.html')


@dataclass
class ServeConfig:
    # 'resume' (out_dir/ckpt), or OpenAI's 'gpt2' ... 'gpt2-xl' or a local HF GPT-2 folder
    init_from: str = 'resume'
    out_dir: str = 'out'  # the training run's folder
    ckpt: str = 'best.pt'
    host: str = '127.0.0.1'  # 0.0.0.0 serves other machines too: there is no authentication
    port: int = 8000
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


# The chat template of a base model, which has no chat format of its own: the messages become plain
# text, one "Role: content" line each, and the model continues after "Assistant:"; generation stops
# where it would start the user's next turn. A model finetuned on conversations has its chat format
# in its vocabulary (chat_format.py), and that is used instead.
CHAT_ROLES = {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'}
CHAT_STOP = '\nUser:'


def chat_prompt(messages):
    lines = [f"{CHAT_ROLES[m.role]}: {m.text()}" for m in messages]
    return '\n'.join(lines + ['Assistant:'])


class APIError(Exception):
    """A bad request: answered with OpenAI's error shape and status 400."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.message, self.param = message, param


def error_response(message, param=None, status=400):
    return JSONResponse({'error': {'message': message, 'type': 'invalid_request_error',
                                   'param': param, 'code': None}}, status_code=status)


class Sampling(BaseModel):
    # other OpenAI fields (user, presence_penalty, ...) are accepted and ignored
    model_config = ConfigDict(extra='ignore')
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # an extension: sample among the k most likely tokens
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream: bool = False


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class Message(BaseModel):
    role: Literal['system', 'developer', 'user', 'assistant']
    content: str | list[dict]

    def text(self):  # content parts: the text ones, joined
        if isinstance(self.content, str):
            return self.content
        return ''.join(part.get('text', '') for part in self.content if part.get('type') == 'text')


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens


async def events(engine, rows, request):
    """(choice index, event) from the engine until every row has finished; rows whose
    client has gone are cancelled, which frees them at the engine's next step."""
    loop, q = asyncio.get_running_loop(), asyncio.Queue()
    for i, row in enumerate(rows):
        row.emit = lambda event, i=i: loop.call_soon_threadsafe(q.put_nowait, (i, event))
    engine.submit(rows)
    left = len(rows)
    try:
        while left:
            try:
                i, event = await asyncio.wait_for(q.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            left -= event['finish_reason'] is not None
            yield i, event
    finally:
        for row in rows:
            row.cancelled = True  # nothing for rows already done


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


def sse(obj):  # one server-sent event
    return f"data: {json.dumps(obj)}\n\n"


def usage(rows):
    # each prompt once, however many rows (n) it has
    prompt = sum(len(p) for p in {id(r.prompt): r.prompt for r in rows}.values())
    completion = sum(len(r.tokens) - len(r.prompt) for r in rows)
    return {'prompt_tokens': prompt, 'completion_tokens': completion,
            'total_tokens': prompt + completion}


def create_app(cfg, model, tokenizer, engine, model_id):
    app = FastAPI(title='nanogpt')
    block_size = model.config.block_size
    max_prompt = cfg.max_prompt_tokens or block_size

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return error_response(e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):
        err = e.errors()[0]
        if err['type'] == 'json_invalid':
            return error_response(f"the request body is not valid JSON: {err['ctx']['error']}")
        loc = '.'.join(str(x) for x in err['loc'][1:])  # after 'body'
        return error_response(f"{loc or 'body'}: {err['msg']}", loc or None)

    def encode(prompt, param='prompt'):
        if isinstance(prompt, list):  # token ids
            bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise APIError(f"token id {bad[0]} is outside the vocabulary "
                               f"(0..{tokenizer.vocab_size - 1})", param)
            ids = prompt
        else:
            try:
                ids = tokenizer.encode(prompt)
            except UserError as e:
                raise APIError(str(e), param) from None
        if not ids:
            raise APIError("the prompt is empty: give it at least one token", param)
        if len(ids) > max_prompt:
            raise APIError(f"the prompt is {len(ids)} tokens, more than this server allows "
                           f"({max_prompt})", param)
        return ids

    def make_rows(req, prompts, max_tokens, stop, logprobs=None, echo=False,
                  stop_token=tokenizer.eot_token):
        """The rows of a request: n per prompt, choice index = prompt * n + j."""
        if req.model != model_id:
            raise APIError(f"model {req.model!r} is not served here: this server serves "
                           f"{model_id!r} (GET /v1/models)", 'model')
        if not 1 <= max_tokens <= cfg.max_tokens:
            raise APIError(f"max_tokens must be between 1 and {cfg.max_tokens}, got {max_tokens}",
                           'max_tokens')
        if req.n * len(prompts) > cfg.max_n:
            raise APIError(f"n ({req.n}) times the prompts ({len(prompts)}) is more than this "
                           f"server allows per request ({cfg.max_n})", 'n')
        stop = [stop] if isinstance(stop, str) else [s for s in stop or [] if s]
        if len(stop) > 4:
            raise APIError("stop takes at most 4 strings", 'stop')
        ids = [encode(p) for p in prompts]
        if echo and max(map(len, ids)) > block_size:
            raise APIError(f"echo needs the whole prompt in the model's context: at most "
                           f"{block_size} tokens", 'prompt')
        seed = random.randrange(2**31) if req.seed is None else req.seed
        return [Row(p, max_tokens, None, temperature=req.temperature, top_k=req.top_k,
                    top_p=None if req.top_p >= 1.0 else req.top_p, seed=seed + j,
                    stop=tuple(stop), stop_token=stop_token, logprobs=logprobs,
                    echo=echo) for p in ids for j in range(req.n)]

    @app.get('/health')
    def health():
        active, waiting = engine.load()
        return {'status': 'ok', 'rows': active, 'waiting': waiting}

    @app.get('/v1/models')
    def models():
        return {'object': 'list', 'data': [{'id': model_id, 'object': 'model',
                                            'created': 0, 'owned_by': 'nanogpt'}]}

    @app.get('/')
    def playground():
        return FileResponse(PLAYGROUND)

    @app.post('/v1/completions')
    async def completions(req: CompletionRequest, request: Request):
        prompts = ([req.prompt] if isinstance(req.prompt, str) or not req.prompt
                   or isinstance(req.prompt[0], int) else req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
        rows = make_rows(req, prompts, max_tokens, req.stop, req.logprobs, req.echo)
        head = {'id': f'cmpl-{uuid.uuid4().hex}', 'object': 'text_completion',
                'created': int(time.time()), 'model': model_id}
        texts = [tokenizer.decode(row.prompt) if req.echo else '' for row in rows]
        lps = [[] for _ in rows]
        finish = [None] * len(rows)
        if req.stream:
            async def stream():
                async for i, ev in events(engine, rows, request):
                    if 'echo' in ev:
                        continue  # streamed with the first token's chunk
                    text, lp = ev.get('text', ''), None
                    if req.logprobs is not None and 'token' in ev:
                        lp = logprobs_of(tokenizer, [(ev['token'], ev['logprob'], ev['top'])], 0)
                    yield sse({**head, 'choices': [{'index': i, 'text': text, 'logprobs': lp,
                                                    'finish_reason': ev['finish_reason']}]})
                yield 'data: [DONE]\n\n'
            return StreamingResponse(stream(), media_type='text/event-stream')
        async for i, ev in events(engine, rows, request):
            if 'error' in ev:
                return error_response(ev['error'], status=500)
            if 'echo' in ev:
                lps[i] += ev['echo']
                continue
            texts[i] += ev['text']
            lps[i].append((ev['token'], ev.get('logprob'), ev.get('top')))
            finish[i] = ev['finish_reason']
        start = [0 if req.echo else len(tokenizer.decode(row.prompt)) for row in rows]
        choices = [{'index': i, 'text': texts[i], 'finish_reason': finish[i],
                    'logprobs': None if req.logprobs is None
                    else logprobs_of(tokenizer, lps[i], start[i])} for i in range(len(rows))]
        return {**head, 'choices': choices, 'usage': usage(rows)}

    @app.post('/v1/chat/completions')
    async def chat(req: ChatRequest, request: Request):
        max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens) if m is not None),
                          256)  # a reply, not OpenAI's "until the context ends"
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if chat_format.has_chat_format(tokenizer):  # the model's own: it ends its turn with <|end|>
            messages = [{'role': CHAT_ROLES[m.role].lower(), 'content': m.text()}
                        for m in req.messages]
            try:
                ids = chat_format.prompt(tokenizer, messages, max_prompt)  # latest turns
            except UserError as e:  # characters a character-level model has no tokens for
                raise APIError(str(e), 'messages') from None
            rows = make_rows(req, [ids], max_tokens, stop,
                             stop_token=chat_format.stop_token(tokenizer))
        else:
            rows = make_rows(req, [chat_prompt(req.messages)], max_tokens, [CHAT_STOP] + stop)
        head = {'id': f'chatcmpl-{uuid.uuid4().hex}', 'created': int(time.time()),
                'model': model_id}
        if req.stream:
            async def stream():
                chunk = {**head, 'object': 'chat.completion.chunk'}
                for i in range(len(rows)):
                    yield sse({**chunk, 'choices': [{'index': i, 'finish_reason': None,
                                                     'delta': {'role': 'assistant',
                                                               'content': ''}}]})
                async for i, ev in events(engine, rows, request):
                    delta = {'content': ev['text']} if ev.get('text') else {}
                    yield sse({**chunk, 'choices': [{'index': i, 'delta': delta,
                                                     'finish_reason': ev['finish_reason']}]})
                yield 'data: [DONE]\n\n'
            return StreamingResponse(stream(), media_type='text/event-stream')
        texts, finish = [''] * len(rows), [None] * len(rows)
        async for i, ev in events(engine, rows, request):
            if 'error' in ev:
                return error_response(ev['error'], status=500)
            texts[i] += ev['text']
            finish[i] = ev['finish_reason']
        choices = [{'index': i, 'finish_reason': finish[i],
                    'message': {'role': 'assistant', 'content': texts[i]}}
                   for i in range(len(rows))]
        return {**head, 'object': 'chat.completion', 'choices': choices, 'usage': usage(rows)}

    return app


def main(cfg):
    """Load the model, start the engine's thread and serve until interrupted."""
    dev = setup(cfg.device, cfg.dtype, sample_rows=cfg.max_rows)
    model, tokenizer, _ = load_model(cfg.init_from, cfg.out_dir, cfg.ckpt)
    model.to(dev.device)
    check_keep(cfg.keep, model.config.block_size)
    if cfg.max_prompt_tokens is not None and cfg.max_prompt_tokens < 1:
        raise UserError(f"max_prompt_tokens must be at least 1, got {cfg.max_prompt_tokens}")
    model_id = cfg.model_name or (os.path.basename(os.path.normpath(cfg.out_dir))
                                  if cfg.init_from == 'resume' else cfg.init_from)
    engine = Engine(model, tokenizer, cfg.max_rows, dev.autocast, cfg.keep,
                    compile=resolve_decode_compile(cfg.compile, dev.device, dev.dtype))
    threading.Thread(target=engine.run, name='engine', daemon=True).start()
    app = create_app(cfg, model, tokenizer, engine, model_id)
    print(f"serving {model_id!r} on {dev.device} ({dev.dtype}) at http://{cfg.host}:{cfg.port}",
          flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level='warning')
    finally:
        engine.stop()


if __name__ == '__main__':
    cli(main, ServeConfig)
