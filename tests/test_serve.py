"""Serving: rows at their own positions compute what each would alone, the engine batches them
without changing their text, and serve.py answers OpenAI's clients (the real `openai` package, a
real browser) with sample.py's text and the model's own log-probabilities."""

import json
import os
import socket
import threading
import time

import pytest
import torch
from torch.nn import functional as F

from conftest import chromium, serving, tiny_gpt, tiny_train_config
from nanogpt.engine import Engine, Row
from nanogpt.generation import RowKVCache, generate
from nanogpt.tokenizer import Tokenizer


@pytest.mark.parametrize('rotary', [False, True])
def test_rows_at_their_own_positions_get_the_logits_each_would_get_alone(rotary):
    model = tiny_gpt(weight_scale=3, rotary=rotary).eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 65, (1, 9), generator=g), torch.randint(0, 65, (1, 4), generator=g)
    with torch.no_grad():
        ref_a, _ = model(a, targets=a)  # (1, 9, vocab): every position's logits, no cache
        ref_b, _ = model(b, targets=b)
        cache = RowKVCache(model, 3)
        # row 0 prefilled with 5 tokens, row 1 with 2: then both decode together, out of step
        la, _ = model(a[:, :5], targets=a[:, :5], cache=cache.rows(0, 1))
        lb, _ = model(b[:, :2], targets=b[:, :2], cache=cache.rows(1, 2))
        assert (la - ref_a[:, :5]).abs().max() < 1e-5 and (lb - ref_b[:, :2]).abs().max() < 1e-5
        for i in range(2):
            logits, _ = model(torch.stack([a[0, 5 + i], b[0, 2 + i]])[:, None],
                              cache=cache.rows(0, 2))
            assert cache.pos.tolist() == [6 + i, 3 + i, 0]
            assert (logits[0, 0] - ref_a[0, 5 + i]).abs().max() < 1e-5
            assert (logits[1, 0] - ref_b[0, 2 + i]).abs().max() < 1e-5


def run_engine(engine, batches, pause=0.05):
    """Submit each batch of rows a little after the one before; return each row's events."""
    events = {}
    done = threading.Semaphore(0)
    for rows in batches:
        for row in rows:
            def emit(ev, row=row):
                events.setdefault(id(row), []).append(ev)
                if ev['finish_reason']:
                    done.release()
            row.emit = emit
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    for rows in batches:
        engine.submit(rows)
        time.sleep(pause)
    for _ in range(sum(map(len, batches))):
        assert done.acquire(timeout=30)
    engine.stop()
    thread.join(5)
    assert not thread.is_alive()
    return events


def test_rows_joining_a_running_batch_get_the_text_they_would_get_alone():
    """Greedy and seeded rows, joining at different steps, with prompts of 1 to 18 tokens past
    block_size 16 (cropped, then refilled): each gets generate()'s tokens for it alone."""
    model = tiny_gpt(weight_scale=3).eval()
    tokenizer = Tokenizer({'kind': 'char', 'chars': ''.join(chr(65 + i) for i in range(65))})
    prompts = [[1, 2, 3], [5], list(range(7, 25)), [4, 4, 4, 4], [9, 9]]
    rows = [Row(p, 40, None, temperature=0 if j % 2 == 0 else 0.9, top_k=None if j < 3 else 20,
                seed=5 + j) for j, p in enumerate(prompts)]
    engine = Engine(model, tokenizer, max_rows=3)  # fewer rows than requests: some wait
    events = run_engine(engine, [rows[:2], rows[2:]])
    for row in rows:
        evs = events[id(row)]
        ref = generate(model, torch.tensor([row.prompt]), 40, temperature=row.temperature,
                       top_k=row.top_k, seeds=torch.tensor([row.seed]))[0, len(row.prompt):]
        assert [e['token'] for e in evs] == ref.tolist()
        assert ''.join(e['text'] for e in evs) == tokenizer.decode(ref.tolist())
        assert [e['finish_reason'] for e in evs] == [None] * 39 + ['length']
    assert engine.load() == (0, 0)


def test_a_stop_string_ends_the_text_before_it_and_is_never_streamed():
    model = tiny_gpt(weight_scale=3).eval()
    tokenizer = Tokenizer({'kind': 'char', 'chars': ''.join(chr(65 + i) for i in range(65))})
    alone = generate(model, torch.tensor([[3]]), 30, temperature=0)[0, 1:].tolist()
    alone = tokenizer.decode(alone)
    stop = alone[10:13]
    row = Row([3], 30, None, temperature=0, stop=('not in it', stop))
    evs = run_engine(Engine(model, tokenizer), [[row]])[id(row)]
    assert ''.join(e['text'] for e in evs) == alone[:alone.find(stop)]
    assert evs[-1]['finish_reason'] == 'stop' and len(evs) == alone.find(stop) + 3


# ---- the server, started as a user would, and the clients people use -------------------------

@pytest.fixture(scope='module')
def trained(tmp_path_factory, char_data):
    from train import main as train
    out = tmp_path_factory.mktemp('serve_run')
    train(tiny_train_config(out, char_data, max_iters=30, block_size=64))
    return str(out)


@pytest.fixture(scope='module')
def server(trained):
    """serve.py on a free port of 127.0.0.1; stopped at the end of the module."""
    with serving(trained, '--device=cpu', '--dtype=float32', '--max_n=4', '--max_tokens=500',
                 '--max_rows=8', '--compile=False') as url:
        yield url


@pytest.fixture
def client(server):
    openai = pytest.importorskip('openai')
    return openai.OpenAI(base_url=server + '/v1', api_key='none', max_retries=0)


def greedy(out_dir, prompt, n):
    """sample.py's greedy text after prompt, in fp32."""
    from sample import SampleConfig
    from sample import main as sample
    text = sample(SampleConfig(out_dir=out_dir, start=prompt, num_samples=1, max_new_tokens=n,
                               temperature=0.0, device='cpu', dtype='float32'))[0]
    return text[len(prompt):]


@pytest.mark.slow
def test_completions_streamed_or_not_are_sample_pys_greedy_text(client, trained):
    name = os.path.basename(trained)
    assert [m.id for m in client.models.list().data] == [name]
    # 100 tokens: past block_size 64, so the server's refill is sample.py's too
    expected = greedy(trained, 'ROMEO:', 100)
    r = client.completions.create(model=name, prompt='ROMEO:', max_tokens=100, temperature=0)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == 'length'
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (6, 100)
    chunks = list(client.completions.create(model=name, prompt='ROMEO:', max_tokens=100,
                                            temperature=0, stream=True))
    assert len(chunks) == 100  # one per token
    assert ''.join(c.choices[0].text for c in chunks) == expected
    # a list of prompts and n: choice p * n + j; seeded rows are sample.py's seed + j
    r = client.completions.create(model=name, prompt=['ROMEO:', 'JULIET:'], n=2, max_tokens=20,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    juliet = greedy(trained, 'JULIET:', 20)
    assert [c.text for c in r.choices] == [expected[:20]] * 2 + [juliet] * 2


@pytest.mark.slow
def test_seeded_sampling_is_sample_pys_text_for_that_seed(client, trained):
    from sample import SampleConfig
    from sample import main as sample
    name = os.path.basename(trained)
    r = client.completions.create(model=name, prompt=['ROMEO:'], n=2, max_tokens=30,
                                  temperature=0.8, seed=7, extra_body={'top_k': 10})
    for j, choice in enumerate(r.choices):
        text = sample(SampleConfig(out_dir=trained, start='ROMEO:', num_samples=1,
                                   max_new_tokens=30, temperature=0.8, top_k=10, seed=7 + j,
                                   device='cpu', dtype='float32'))[0]
        assert choice.text == text[len('ROMEO:'):]


@pytest.mark.slow
def test_chat_completions_are_the_template_continued(client, trained):
    from serve import CHAT_STOP
    name = os.path.basename(trained)
    messages = [{'role': 'system', 'content': 'Speak as a Roman.'},
                {'role': 'user', 'content': 'Who goes there?'}]
    prompt = 'System: Speak as a Roman.\nUser: Who goes there?\nAssistant:'
    expected = greedy(trained, prompt, 60)
    expected = expected[:expected.find(CHAT_STOP)] if CHAT_STOP in expected else expected
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=60,
                                       temperature=0)
    assert r.choices[0].message.role == 'assistant'
    assert r.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=60,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert ''.join(c.choices[0].delta.content or '' for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ('stop', 'length')


@pytest.mark.slow
def test_echo_logprobs_are_the_models_own_log_softmax(client, trained):
    """What lm-evaluation-harness's local-completions asks for to score a continuation."""
    from nanogpt.checkpoint import load_model
    model, tokenizer, _ = load_model('resume', trained)
    prompt = 'First Citizen:\nBefore we proceed any further, hear me speak.'
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        x = torch.tensor([ids])
        logits, _ = model(x, targets=x)  # (1, T, vocab): every position's
        logp = F.log_softmax(logits[0], dim=-1)
    for p in (prompt, ids):  # text, or token ids as lm-eval sends by default
        r = client.completions.create(model=os.path.basename(trained), prompt=p, max_tokens=1,
                                      temperature=0, echo=True, logprobs=3)
        lp = r.choices[0].logprobs
        assert r.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + 1
        assert ''.join(lp.tokens[:-1]) == prompt and lp.token_logprobs[0] is None
        expected = logp[torch.arange(len(ids) - 1), ids[1:]]
        assert torch.allclose(torch.tensor(lp.token_logprobs[1:-1]), expected, atol=1e-5)
        assert lp.token_logprobs[-1] == pytest.approx(logp[-1].max().item(), abs=1e-5)  # greedy
        top = lp.top_logprobs[6]  # the 3 most likely tokens after the prompt's first 6
        assert sorted(top.values(), reverse=True) == pytest.approx(
            logp[5].topk(3).values.tolist(), abs=1e-5)


@pytest.mark.slow
def test_bad_requests_get_400_with_a_readable_message_and_the_server_keeps_answering(client,
                                                                                       server,
                                                                                       trained):
    import httpx
    import openai
    name = os.path.basename(trained)
    bad = [(dict(model='gpt-4', prompt='a'), "'gpt-4' is not served here"),
           (dict(model=name, prompt='a', max_tokens=0), 'max_tokens must be between 1 and 500'),
           (dict(model=name, prompt='a', max_tokens=501), 'max_tokens must be between 1 and 500'),
           (dict(model=name, prompt='héllo €'), "characters not in the model's vocabulary"),
           (dict(model=name, prompt='a' * 65), 'more than this server allows (64)'),
           (dict(model=name, prompt='a', n=5), 'more than this server allows per request (4)'),
           (dict(model=name, prompt=[70000]), 'outside the vocabulary'),
           (dict(model=name, prompt=''), 'the prompt is empty'),
           (dict(model=name, prompt='a', temperature=-1), 'temperature')]
    for kwargs, message in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kwargs)
        assert e.value.status_code == 400 and message in e.value.body['message'], kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=name, messages=[{'role': 'user', 'content': '€'}])
    assert "characters not in the model's vocabulary" in e.value.body['message']
    r = httpx.post(server + '/v1/completions', content=b'{"model": "x", "prompt": ',
                   headers={'Content-Type': 'application/json'})
    assert r.status_code == 400 and 'not valid JSON' in r.json()['error']['message']
    # still serving
    assert client.completions.create(model=name, prompt='a', max_tokens=3).choices[0].text


@pytest.mark.slow
def test_concurrent_clients_get_their_own_text_and_a_leaving_client_frees_its_row(client, server,
                                                                                  trained):
    import httpx
    name = os.path.basename(trained)
    prompts = ['ROMEO:', 'JULIET:', 'First Citizen:', 'KING HENRY', 'O']
    expected = {p: greedy(trained, p, 80) for p in prompts}
    got = {}
    # a client that leaves after two tokens of a long text
    body = {'model': name, 'prompt': 'MENENIUS:', 'max_tokens': 500, 'stream': True}
    with httpx.stream('POST', server + '/v1/completions', json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith('data: ')

    def ask(p):
        chunks = client.completions.create(model=name, prompt=p, max_tokens=80, temperature=0,
                                           stream=True)
        got[p] = ''.join(c.choices[0].text for c in chunks)
    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected
    for _ in range(50):  # the engine notices at its next step; nothing else is running
        health = httpx.get(server + '/health').json()
        if health['rows'] == 0:
            break
        time.sleep(0.1)
    assert health == {'status': 'ok', 'rows': 0, 'waiting': 0}


@pytest.mark.slow
def test_the_playground_streams_text_into_the_page(server):
    """In headless Chromium: type a prompt, press Generate, see the text grow as it streams."""
    with chromium() as driver:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
        driver.get(server + '/')
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, 'model').text)
        box = driver.find_element(By.ID, 'prompt')
        box.clear()
        box.send_keys('JULIET:')
        steps = driver.find_element(By.ID, 'max_tokens')
        steps.clear()
        steps.send_keys('400')
        driver.find_element(By.ID, 'generate').click()
        output = driver.find_element(By.ID, 'output')
        seen = set()  # the output's lengths, polled until the button is enabled again (done)
        WebDriverWait(driver, 60, poll_frequency=0.02).until(
            lambda d: seen.add(len(output.text)) or d.find_element(By.ID, 'generate').is_enabled())
        # lengths in between: the text arrived in pieces, not all at once
        assert len([n for n in seen if len('JULIET:') < n < len(output.text)]) >= 2
        assert output.text.startswith('JULIET:') and len(output.text) > len('JULIET:') + 200
        assert '400 tokens' in driver.find_element(By.ID, 'stats').text


def test_the_chat_template_is_one_role_line_per_message():
    pytest.importorskip('fastapi')
    from serve import Message, chat_prompt
    msgs = [Message(role='system', content='Be brief.'),
            Message(role='user', content=[{'type': 'text', 'text': 'Hi'}]),
            Message(role='assistant', content='Hello.'), Message(role='user', content='Bye')]
    assert chat_prompt(msgs) == ('System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\n'
                                 'Assistant:')



# ---- the server's edges (issues 25 and 29), in this process: a tiny random model, faults injected

@pytest.fixture
def tiny_server():
    """serve.py's app for a tiny random model (tiny Shakespeare's 65 characters), served from this
    process on a free port of 127.0.0.1 with its engine's thread; yields (url, engine) and stops
    both."""
    pytest.importorskip('fastapi', reason='pip install -e .[serve]')
    import string

    import uvicorn

    import serve
    chars = "\n !$&',-.3:;?" + string.ascii_uppercase + string.ascii_lowercase
    tokenizer = Tokenizer({'kind': 'char', 'chars': chars})
    model = tiny_gpt(weight_scale=3, block_size=64).eval()
    engine = Engine(model, tokenizer, max_rows=4)
    app = serve.create_app(serve.ServeConfig(max_tokens=5000), tokenizer, engine, 'tiny', 64)
    sock = serve.listen('127.0.0.1', 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level='critical'))
    threads = [threading.Thread(target=engine.run, daemon=True),
               threading.Thread(target=server.run, kwargs={'sockets': [sock]}, daemon=True)]
    for t in threads:
        t.start()
    try:
        while not server.started:
            time.sleep(0.01)
        yield f'http://127.0.0.1:{sock.getsockname()[1]}', engine
    finally:
        server.should_exit = True
        engine.stop()
        for t in threads:
            t.join(10)
        sock.close()


def test_a_client_that_gives_up_on_a_collected_answer_frees_its_row(tiny_server, monkeypatch):
    import httpx
    url, engine = tiny_server
    step = Engine.step
    monkeypatch.setattr(Engine, 'step', lambda self: (time.sleep(0.005), step(self)))
    body = {'model': 'tiny', 'prompt': 'A', 'max_tokens': 2000}  # ~10 s of steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + '/v1/completions', json=body, timeout=0.5)
    t0 = time.perf_counter()
    while engine.load() != (0, 0):
        assert time.perf_counter() - t0 < 2, "the row is still decoding for nobody"
        time.sleep(0.05)


def test_a_failure_inside_generation_is_a_500_server_error_and_the_server_goes_on(tiny_server,
                                                                                  monkeypatch):
    import httpx
    openai = pytest.importorskip('openai')
    url, engine = tiny_server
    client = openai.OpenAI(base_url=url + '/v1', api_key='none', max_retries=0)
    from nanogpt import engine as engine_module
    sample, steps, fail_at = engine_module.sample_next, [0], [1]

    def failing_sample(*args, **kwargs):  # the fail_at-th step from now raises, once
        steps[0] += 1
        if steps[0] == fail_at[0]:
            raise RuntimeError('boom')
        return sample(*args, **kwargs)
    monkeypatch.setattr(engine_module, 'sample_next', failing_sample)
    for stream in (False, True):  # before anything was sent: the whole answer is the error
        steps[0] = 0
        r = httpx.post(url + '/v1/completions', timeout=10, json={
            'model': 'tiny', 'prompt': 'A', 'max_tokens': 5, 'stream': stream})
        assert r.status_code == 500 and r.json()['error'] == {
            'message': 'generation failed: RuntimeError: boom', 'type': 'server_error',
            'param': None, 'code': None}
    steps[0], fail_at[0] = 0, 4  # mid-stream: the stream's last event, which the client raises
    chunks = client.chat.completions.create(model='tiny', messages=[{'role': 'user',
                                                                     'content': 'A'}],
                                            max_tokens=50, temperature=0, stream=True)
    with pytest.raises(openai.APIError, match='generation failed: RuntimeError: boom'):
        for _ in chunks:
            pass
    r = client.completions.create(model='tiny', prompt='A', max_tokens=5)  # still serving
    assert len(r.choices[0].text) == 5


@pytest.mark.parametrize('path, body, message', [
    ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': [{'type': 'text',
                                                                         'text': 5}]}]},
     'messages.0.content.0.text: Input should be a valid string'),
    ('/v1/completions', {'prompt': 'A', 'seed': 2**70}, 'seed: Input should be less than'),
    ('/v1/completions', b'{"model": "tiny", "prompt": "\xff"}', 'send UTF-8 JSON'),
    ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': 'A'}],
                              'stop': ['B', 'C', 'D', 'E', 'F']}, 'stop takes at most 4'),
    ('/v1/nothing', {}, 'Not Found'),
])
def test_every_bad_request_is_one_openai_error_and_the_server_goes_on(tiny_server, path, body,
                                                                      message):
    import httpx
    url, engine = tiny_server
    content = body if isinstance(body, bytes) else json.dumps({'model': 'tiny', **body}).encode()
    r = httpx.post(url + path, content=content, headers={'Content-Type': 'application/json'})
    error = r.json()['error']
    assert r.status_code in (400, 404) and error['type'] == 'invalid_request_error'
    assert message in error['message']
    r = httpx.post(url + '/v1/completions', json={'model': 'tiny', 'prompt': 'A', 'seed': -2**63})
    assert r.status_code == 200


def test_a_chat_on_a_base_model_takes_four_stop_strings_of_the_clients(tiny_server):
    import httpx
    url, _ = tiny_server
    body = {'model': 'tiny', 'messages': [{'role': 'user', 'content': 'A'}], 'max_tokens': 40,
            'temperature': 0}
    full = httpx.post(url + '/v1/chat/completions', json=body).json()
    text = full['choices'][0]['message']['content']
    stops = [text[20:22], 'x', 'y', 'z']
    r = httpx.post(url + '/v1/chat/completions', json={**body, 'stop': stops})
    assert r.status_code == 200, r.text
    assert r.json()['choices'][0] == {'index': 0, 'finish_reason': 'stop', 'message': {
        'role': 'assistant', 'content': text[:text.find(stops[0])]}}


@pytest.mark.parametrize('setting, message', [
    (dict(max_rows=0), 'max_rows must be at least 1, got 0'),
    (dict(max_n=0), 'max_n must be at least 1, got 0'),
    (dict(max_tokens=-1), 'max_tokens must be at least 1, got -1'),
    (dict(max_prompt_tokens=0), 'max_prompt_tokens must be at least 1, got 0'),
    (dict(keep=0), 'keep must be at least 1, got 0'),
    (dict(port=70000), 'port must be in 0..65535'),
    (dict(port='busy'), 'cannot listen on 127.0.0.1:'),
])
def test_server_settings_that_cannot_serve_are_refused_before_a_model_loads(tmp_path, setting,
                                                                            message):
    pytest.importorskip('fastapi', reason='pip install -e .[serve]')
    import serve
    from nanogpt.errors import UserError
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        if setting.get('port') == 'busy':
            setting = dict(port=busy.getsockname()[1])
        cfg = serve.ServeConfig(out_dir=str(tmp_path / 'no-run'), device='cpu', **setting)
        with pytest.raises(UserError, match=message):  # not "no checkpoint in ...": not loaded
            serve.main(cfg)


def test_the_servers_connections_send_each_token_at_once_without_nagles_delay():
    # serve.listen binds the socket uvicorn serves; asyncio turns Nagle's algorithm off on what it
    # accepts only when the socket says it is TCP. With Nagle on, a streamed token waited for the
    # client's delayed ACK of the last one: +40 ms to the first token of each keep-alive request.
    pytest.importorskip('fastapi', reason='pip install -e .[serve]')
    import asyncio

    import serve
    sock = serve.listen('127.0.0.1', 0)

    async def accept_one():
        accepted = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(
            lambda r, w: accepted.set_result(w.get_extra_info('socket')), sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        nodelay = (await accepted).getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        server.close()
        return nodelay

    assert asyncio.run(accept_one()) == 1
