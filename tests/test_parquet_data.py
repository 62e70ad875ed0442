"""GPT-2-scale corpora from parquet (data/fineweb_edu, data/openwebtext): downloaded from a local
stand-in for the Hugging Face Hub on 127.0.0.1 (HF_ENDPOINT points at it), resumed when cut off,
checked, tokenised into bins train.py trains on."""

import hashlib
import http.server
import json
import threading
from urllib.parse import unquote

import numpy as np
import pytest

from conftest import run_script, tiny_train_config

pa = pytest.importorskip('pyarrow')
pq = pytest.importorskip('pyarrow.parquet')

FINEWEB = ('data/fineweb_edu/prepare.py', 'HuggingFaceFW/fineweb-edu', 'main', 'sample/10BT')
OWT = ('data/openwebtext/prepare.py', 'Skylion007/openwebtext', 'refs/convert/parquet',
       'plain_text/train')


def documents(shard, n=40):
    """n documents of shard `shard`: different lengths, non-ASCII, an empty one, and the literal
    text of the end-of-text token, which must stay text. Shard 1 holds ~300 KB of random hex
    digits too, that parquet cannot compress: a file larger than a download's 64 KiB reads."""
    rng = np.random.default_rng(shard)
    docs = [f"Shard {shard}, document {i}: {'the quick brown fox ' * (i % 7)}café ✓\n"
            + (rng.bytes(4000).hex() if shard == 1 else '') for i in range(n)]
    docs[3] = ''
    docs[5] = 'a literal <|endoftext|> is text, not a boundary'
    return docs


def write_shard(path, docs, row_group_size=16):
    """A parquet file as the Hub's: a 'text' column (and others, not read), several row groups."""
    table = pa.table({'text': docs, 'id': [f'<urn:{i}>' for i in range(len(docs))]})
    pq.write_table(table, path, row_group_size=row_group_size)


class Hub(http.server.ThreadingHTTPServer):
    """The two routes of the Hub the prepare scripts use, for one dataset repository:
    /api/datasets/REPO/tree/REVISION/FOLDER (the listing, with each file's size and SHA-256) and
    /datasets/REPO/resolve/REVISION/PATH (the bytes, with HTTP Range). A path in `cut` is sent
    only half-way, once, then the connection closes; `requests` records each file request's
    (path, Range header)."""

    def __init__(self, repo, revision, files):
        super().__init__(('127.0.0.1', 0), HubHandler)
        self.repo, self.revision, self.files = repo, revision, files  # files: {path: bytes}
        self.cut, self.requests = set(), []
        self.listed_sha256 = {}  # path: the SHA-256 to list instead of the bytes' own
        self.url = f'http://127.0.0.1:{self.server_address[1]}'


class HubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        hub = self.server
        tree = f'/api/datasets/{hub.repo}/tree/'
        resolve = f'/datasets/{hub.repo}/resolve/'
        if self.path.startswith(tree):
            revision, _, folder = self.path[len(tree):].partition('/')
            assert unquote(revision) == hub.revision
            listing = [{'type': 'file', 'path': p, 'size': len(b),
                        'lfs': {'oid': hub.listed_sha256.get(p, hashlib.sha256(b).hexdigest()),
                                'size': len(b)}}
                       for p, b in hub.files.items() if p.startswith(folder + '/')]
            return self.reply(200, json.dumps(listing).encode())
        if not self.path.startswith(resolve):
            return self.reply(404, b'not found')
        revision, _, path = self.path[len(resolve):].partition('/')
        assert unquote(revision) == hub.revision
        if path not in hub.files:
            return self.reply(404, b'not found')
        data, start = hub.files[path], 0
        hub.requests.append((path, self.headers.get('Range')))
        if self.headers.get('Range'):
            start = int(self.headers['Range'].removeprefix('bytes=').rstrip('-'))
            self.send_response(206)
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        else:
            self.send_response(200)
        self.send_header('Content-Length', str(len(data) - start))
        self.end_headers()
        if path in hub.cut:  # half the bytes, then the connection drops
            hub.cut.discard(path)
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def reply(self, status, body):
        self.send_response(status)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def hub(tmp_path):
    """A Hub holding, for each of FineWeb-Edu and OpenWebText, three small shards in the real
    layout; yields a function (script) -> (Hub, the documents of each shard); stops the servers."""
    servers = []

    def start(script):
        _, repo, revision, folder = script
        shards, files = [], {}
        for i in range(3):
            docs = documents(i)
            name = f'{i:03d}_00000.parquet' if folder == 'sample/10BT' else f'{i:04d}.parquet'
            write_shard(tmp_path / name, docs)
            files[f'{folder}/{name}'] = (tmp_path / name).read_bytes()
            shards.append(docs)
        server = Hub(repo, revision, files)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, shards
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_datasets(tmp_path):
    """A PYTHONPATH on which `import datasets` fails, as where Hugging Face datasets is absent."""
    fake = tmp_path / 'no_datasets'
    (fake / 'datasets').mkdir(parents=True)
    (fake / 'datasets' / '__init__.py').write_text("raise ImportError('datasets is absent')\n")
    return str(fake)


def prepare(script, server, out, *args, pythonpath=None):
    env = {'HF_ENDPOINT': server.url}
    if pythonpath:
        env['PYTHONPATH'] = pythonpath
    return run_script(script[0], '--out_dir', str(out), '--download_dir', str(out / 'parquet'),
                      '--num_proc=2', '--val_docs=50', *args, env=env)


def bins(out):
    with open(out / 'meta.json') as f:
        meta = json.load(f)
    return meta, {s: np.fromfile(out / f'{s}.bin', dtype=np.uint16) for s in ('train', 'val')}


def expected_ids(tok, docs):
    return [i for d in docs for i in tok.enc.encode_ordinary(d) + [tok.eot_token]]


@pytest.mark.slow
@pytest.mark.parametrize('script', [FINEWEB, OWT], ids=['fineweb_edu', 'openwebtext'])
def test_prepare_from_the_hub_writes_each_document_as_tiktoken_encodes_it_then_end_of_text(
        tmp_path, hub, gpt2_bpe, no_datasets, script):
    server, shards = hub(script)
    # --shards=2: the first two files only; `datasets` cannot be imported at all
    r = prepare(script, server, tmp_path / 'out', '--shards=2', pythonpath=no_datasets)
    assert r.returncode == 0, r.stderr
    meta, ids = bins(tmp_path / 'out')
    docs = shards[0] + shards[1]
    # val: the first 50 documents, in file order; train: every later one, byte for byte
    assert ids['val'].tolist() == expected_ids(gpt2_bpe, docs[:50])
    assert ids['train'].tolist() == expected_ids(gpt2_bpe, docs[50:])
    assert meta['vocab_size'] == 50257 and meta['source']['documents'] == {'train': 30, 'val': 50}
    assert meta['val']['sha256'] == hashlib.sha256(ids['val'].tobytes()).hexdigest()
    assert sorted(p for p, _ in server.requests) == sorted(list(server.files)[:2])
    # the downloaded files are the Hub's, whole, and nothing partial is left beside them
    downloaded = sorted((tmp_path / 'out' / 'parquet').iterdir())
    assert [p.read_bytes() for p in downloaded] == list(server.files.values())[:2]


@pytest.mark.slow
def test_a_download_cut_off_half_way_resumes_and_gives_the_same_bins(tmp_path, hub, gpt2_bpe):
    server, _ = hub(FINEWEB)
    r = prepare(FINEWEB, server, tmp_path / 'whole')
    assert r.returncode == 0, r.stderr
    second = 'sample/10BT/001_00000.parquet'
    server.cut.add(second)
    r = prepare(FINEWEB, server, tmp_path / 'cut')
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert 'run the same command again to resume' in r.stderr
    # the half is kept aside as .partial, never where a whole file is expected; no bins yet
    parquet = tmp_path / 'cut' / 'parquet'
    size = len(server.files[second])
    kept = (parquet / '001_00000.parquet.partial').read_bytes()
    # what arrived before the cut, less the read it was in the middle of
    assert 0 < len(kept) <= size // 2 and kept == server.files[second][:len(kept)]
    assert not (parquet / '001_00000.parquet').exists()
    assert not (tmp_path / 'cut' / 'meta.json').exists()
    server.requests.clear()
    r = prepare(FINEWEB, server, tmp_path / 'cut')
    assert r.returncode == 0, r.stderr
    # the rerun fetched the rest of the cut file only, and the first file not again
    assert server.requests == [(second, f'bytes={len(kept)}-'),
                               ('sample/10BT/002_00000.parquet', None)]
    assert (parquet / '001_00000.parquet').read_bytes() == server.files[second]
    whole, cut = bins(tmp_path / 'whole'), bins(tmp_path / 'cut')
    assert whole[0]['train'] == cut[0]['train'] and whole[0]['val'] == cut[0]['val']


@pytest.mark.slow
def test_a_corrupt_shard_is_refused_in_one_line(tmp_path, hub, gpt2_bpe):
    # on disk (--input): a file cut short
    local = tmp_path / 'local'
    local.mkdir()
    write_shard(local / '000.parquet', documents(0))
    data = (local / '000.parquet').read_bytes()
    (local / '000.parquet').write_bytes(data[:len(data) // 2])
    r = run_script(FINEWEB[0], '--input', str(local), '--out_dir', str(tmp_path / 'o'))
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert f'{local / "000.parquet"} is not a readable parquet file' in r.stderr
    assert not (tmp_path / 'o' / 'meta.json').exists()
    # from the Hub: bytes that are not the ones the listing's SHA-256 names are deleted
    server, _ = hub(FINEWEB)
    first = 'sample/10BT/000_00000.parquet'
    listed = server.files[first]
    server.listed_sha256[first] = hashlib.sha256(listed).hexdigest()
    server.files[first] = listed[:-1] + bytes([listed[-1] ^ 1])  # one bit flipped on the way
    r = run_script(FINEWEB[0], '--out_dir', str(tmp_path / 'o'), '--download_dir',
                   str(tmp_path / 'o' / 'parquet'), env={'HF_ENDPOINT': server.url})
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert 'arrived corrupt' in r.stderr and 'run the same command again' in r.stderr
    assert list((tmp_path / 'o' / 'parquet').iterdir()) == []


@pytest.mark.slow
def test_train_trains_on_the_prepared_corpus(tmp_path, hub, gpt2_bpe):
    import train
    server, _ = hub(FINEWEB)
    r = prepare(FINEWEB, server, tmp_path / 'data')
    assert r.returncode == 0, r.stderr
    cfg = tiny_train_config(tmp_path / 'out', tmp_path / 'data', dataset='fineweb_edu',
                            max_iters=30, lr_decay_iters=30, eval_interval=30, batch_size=4,
                            block_size=16, learning_rate=1e-2)
    result = train.main(cfg)
    # from ln(50257) = 10.8 at init to well below it on 30 steps of this repetitive text
    assert result['iter_num'] == 30 and result['losses']['train'] < 7.0


def test_the_fineweb_recipe_is_llm_c_s_step_and_schedule():
    from configurator import load_config
    from train import TrainConfig, check_config
    cfg = load_config(TrainConfig, ['config/train_gpt2_fineweb.py'])
    check_config(cfg)
    # 2**19 tokens per step, one epoch of 10B tokens, lr 6e-4 warming up over 700 steps to 0
    assert cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps == 524_288
    assert (cfg.max_iters, cfg.warmup_iters, cfg.learning_rate, cfg.min_lr) == (19073, 700, 6e-4, 0)
    assert cfg.dataset == 'fineweb_edu' and cfg.eval_interval == 250
