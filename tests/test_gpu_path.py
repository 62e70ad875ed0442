"""The GPU path, pinned on the CPU: MFU per process, fp16 resumes, the dtype policy per GPU, device
indices, the peak-FLOPs table, a padded vocabulary that samples, evaluates and exports like an
unpadded one, per-token sampling cost independent of the number of rows, fewer host syncs, loading
without random init, and the GPU check script's dry run."""

import dataclasses
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from conftest import dir_snapshot, flags, metrics, run_script, tiny_gpt, tiny_train_config
from nanogpt import device
from nanogpt.checkpoint import (
    load_checkpoint,
    load_model,
    model_from_checkpoint,
    restore_training,
    save_checkpoint,
)
from nanogpt.errors import UserError
from nanogpt.generation import KVCache, sample_next
from nanogpt.init_from import init_model
from nanogpt.optimizers import configure_optimizers

# --------------------------------------------------------------------------------------------------
# MFU and the peak it is measured against


@pytest.mark.slow
def test_mfu_under_ddp_counts_one_process_work_against_one_device_peak(tmp_path, char_data):
    # the same work per process: 1 process x 1 micro-step, and 2 processes x 1 micro-step each.
    # mfu * seconds per step * peak is the FLOPs of one process's step, whatever the timing noise
    cfg = dict(max_iters=6, eval_interval=6, eval_iters=1, log_interval=2, batch_size=4,
               peak_flops=1e9)
    one = tiny_train_config(tmp_path / 'one', char_data, gradient_accumulation_steps=1, **cfg)
    two = tiny_train_config(tmp_path / 'two', char_data, gradient_accumulation_steps=2, **cfg)
    train.main(one)
    r = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                   *flags(two), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]

    def flops_per_process_step(out_dir):
        rows = [row for row in metrics(out_dir) if 'mfu' in row]
        assert rows  # the first window (compilation, warm-up) is left out, the later ones kept
        return [row['mfu'] * row['ms_per_iter'] / 1000 * 1e9 for row in rows]

    model = init_model(one, None, 65, verbose=False)[0]
    expected = model.flops_per_token() * 4 * 32  # 4 rows of 32 tokens per process and step
    for out_dir in (one.out_dir, two.out_dir):
        for flops in flops_per_process_step(out_dir):
            assert flops == pytest.approx(expected, rel=1e-3)


def test_the_peak_table_matches_whole_gpu_names_and_the_dtype():
    assert device.gpu_peak_flops('NVIDIA H100 80GB HBM3') == 989e12
    assert device.gpu_peak_flops('NVIDIA H100 PCIe') == 756e12
    assert device.gpu_peak_flops('NVIDIA H100 NVL') == 835e12
    assert device.gpu_peak_flops('NVIDIA H200') == 989e12  # not the H20's
    assert device.gpu_peak_flops('NVIDIA H20') == 148e12
    assert device.gpu_peak_flops('NVIDIA A100-SXM4-80GB') == 312e12
    assert device.gpu_peak_flops('NVIDIA RTX A1000') is None  # no A100, and unknown: no MFU
    assert device.gpu_peak_flops('NVIDIA L4') == 121e12  # not the L40S's
    # an fp32 run is measured against TF32's tensor-core peak, or plain fp32's without TF32
    assert device.gpu_peak_flops('NVIDIA A100-SXM4-80GB', 'float32', tf32=True) == 156e12
    assert device.gpu_peak_flops('NVIDIA A100-SXM4-80GB', 'float32', tf32=False) == 19.5e12
    assert device.gpu_peak_flops('Tesla V100-SXM2-16GB', 'float32', tf32=True) == 15.7e12


def test_an_untied_token_embedding_is_a_lookup_not_matmul_work():
    # the same matmuls tied or not (the head); the untied embedding adds parameters, not FLOPs
    tied, untied = tiny_gpt(), tiny_gpt(tie_weights=False)
    assert untied.get_num_params() > tied.get_num_params()
    assert untied.flops_per_token() == tied.flops_per_token()


# --------------------------------------------------------------------------------------------------
# device and dtype


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA with cuda:0 an Ampere (sm80) and cuda:1 a V100 (sm70); records which GPU was asked."""
    asked = []

    def capability(d):
        asked.append(str(d))
        return {'cuda:0': (8, 0), 'cuda:1': (7, 0)}[str(d) if ':' in str(d) else 'cuda:0']
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', capability)
    return asked


def test_auto_dtype_is_bf16_from_sm80_and_fp16_before_on_the_gpu_asked_for(two_gpus):
    assert device.resolve_dtype('auto', 'cuda:0') == 'bfloat16'
    assert device.resolve_dtype('auto', 'cuda:1') == 'float16'  # a V100 emulates bf16: slow
    assert two_gpus == ['cuda:0', 'cuda:1']
    assert device.resolve_sample_dtype('auto', 'cuda:1') == 'float32'
    assert device.resolve_sample_dtype('auto', 'cuda:0') == 'bfloat16'


def test_a_gpu_index_beyond_the_machine_is_a_one_line_error(two_gpus):
    assert device.resolve_device('cuda:1') == 'cuda:1'
    for bad in ('cuda:2', 'cuda:x'):
        with pytest.raises(UserError, match=r"this machine has 2 GPU\(s\), cuda:0 to cuda:1"):
            device.resolve_device(bad)


# --------------------------------------------------------------------------------------------------
# resuming in fp16


@pytest.mark.parametrize('saved_in', ['float32', 'fp16'])
def test_an_fp16_resume_takes_any_checkpoint(tmp_path, char_data, saved_in):
    cfg = tiny_train_config(tmp_path, char_data, max_iters=2, eval_interval=2)
    train.main(cfg)
    ckpt = load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))
    assert ckpt['scaler'] == {}  # no fp16, no scaler state
    fp16_state = None
    if saved_in == 'fp16':  # an fp16 run's scaler, its scale down from 65536 to 512
        ckpt['scaler'] = fp16_state = torch.amp.GradScaler('cpu', init_scale=512.0).state_dict()
    resumed = dataclasses.replace(cfg, init_from='resume', max_iters=4)
    model, _ = init_model(resumed, ckpt['vocab'], 65, verbose=False)
    for enabled in (True, False):  # resumed in fp16 (a CPU scaler stands in for CUDA's), or not
        scaler = torch.amp.GradScaler('cpu', enabled=enabled)
        restore_training(ckpt, model, configure_optimizers(model, resumed, 'cpu'), scaler)
        if enabled:
            assert scaler.get_scale() == (512.0 if fp16_state else 65536.0)  # else a fresh scaler


# --------------------------------------------------------------------------------------------------
# a padded vocabulary


@pytest.fixture(scope='module')
def padded_run(tmp_path_factory, bpe_data):
    """A tiny model trained from scratch on GPT-2 BPE data: its 50,257 tokens padded to 50,304."""
    out_dir = tmp_path_factory.mktemp('padded')
    train.main(tiny_train_config(out_dir, bpe_data, dataset='shakespeare', n_layer=1, n_embd=16,
                                 max_iters=4, eval_interval=4, eval_iters=1))
    return str(out_dir)


def test_a_bpe_model_from_scratch_trains_with_a_padded_vocabulary(padded_run):
    ckpt = load_checkpoint(os.path.join(padded_run, 'best.pt'))
    assert ckpt['model_args']['vocab_size'] == 50304 and ckpt['model']['lm_head.weight'].shape[0] \
        == 50304
    # ... and loads for sampling and evaluation with exactly the vocabulary's 50,257 rows
    model, tokenizer, _ = load_model('resume', padded_run, 'best.pt')
    assert model.config.vocab_size == tokenizer.vocab_size == 50257
    assert model.transformer.wte.weight is model.lm_head.weight  # still tied
    full = model_from_checkpoint(ckpt, dropout=0.0).eval()
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, idx)[0], full(idx, idx)[0][..., :50257],
                                   rtol=0, atol=0)


@pytest.mark.slow  # a sample and two evaluations of a 50k-token model
def test_padded_rows_are_never_sampled_and_change_no_evaluation(padded_run, bpe_data):
    import eval as eval_script
    import sample as sample_script
    base = eval_script.EvalConfig(out_dir=padded_run, data_dir=bpe_data, device='cpu',
                                  max_tokens=3000, bleu_samples=0, batch_size=4)
    before = eval_script.main(base)
    # make the padded rows win every softmax: were they kept, every sampled id would be >= 50257
    path = os.path.join(padded_run, 'best.pt')
    ckpt = load_checkpoint(path)
    sd = {k: v.clone() for k, v in ckpt['model'].items()}
    sd['lm_head.weight'][50257:] = 1e3
    sd['transformer.wte.weight'] = sd['lm_head.weight']
    save_checkpoint({**ckpt, 'model': sd}, os.path.join(padded_run, 'boosted'), is_best=True)
    boosted = dataclasses.replace(base, out_dir=os.path.join(padded_run, 'boosted'))
    after = eval_script.main(boosted)
    assert after['loss'] == before['loss'] and after['bits_per_byte'] == before['bits_per_byte']
    texts = sample_script.main(sample_script.SampleConfig(
        out_dir=boosted.out_dir, start='ROMEO:', num_samples=2, max_new_tokens=20, device='cpu'))
    again = sample_script.main(sample_script.SampleConfig(
        out_dir=padded_run, start='ROMEO:', num_samples=2, max_new_tokens=20, device='cpu'))
    assert texts == again


def test_a_padded_model_exports_the_vocabulary_transformers_reads(padded_run, tmp_path):
    from transformers import GPT2LMHeadModel

    from scripts.export_hf import ExportConfig
    from scripts.export_hf import main as export
    hf_dir = export(ExportConfig(out_dir=padded_run, hf_dir=str(tmp_path / 'hf')))
    with open(os.path.join(hf_dir, 'config.json')) as f:
        assert json.load(f)['vocab_size'] == 50257
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model = load_model('resume', padded_run, 'best.pt')[0]
    idx = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx, idx)[0], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------------
# generation


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def decode_step_ops(rows):
    """Operators run by one decode step of `rows` rows: a forward of one new token on a warm
    cache, then sampling one token per row, each row from its own random stream."""
    model = tiny_gpt().eval()
    cache = KVCache(model, rows)
    idx = torch.randint(0, 65, (rows, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(idx, cache=cache)  # the prefill
        with OpCounter() as counter:
            logits, _ = model(idx[:, -1:], cache=cache)
            sample_next(logits[:, -1], temperature=0.8, top_k=10, top_p=0.9,
                        seeds=torch.arange(rows), step=5)
    return counter.ops


def test_a_decode_step_runs_as_many_operators_for_ten_rows_as_for_one():
    assert decode_step_ops(10) == decode_step_ops(1)


def test_the_cache_is_kept_in_half_precision_where_prefills_run_in_it(monkeypatch):
    # on GPUs (HALF_PRECISION_PREFILL), here faked on the CPU: a bf16 cache, bf16 prefills
    from nanogpt import generation
    model = tiny_gpt(weight_scale=3.0).eval()
    idx = torch.randint(0, 65, (2, 5), generator=torch.Generator().manual_seed(0))
    caches = []
    monkeypatch.setattr(generation, 'KVCache', lambda *a: caches.append(KVCache(*a)) or caches[-1])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        cpu_policy = generation.generate(model, idx, 6, temperature=0.0)
        monkeypatch.setattr(generation, 'HALF_PRECISION_PREFILL', {'cpu'})
        gpu_policy = generation.generate(model, idx, 6, temperature=0.0)
    assert [c.k[0].dtype for c in caches] == [torch.float32, torch.bfloat16]
    # peaky logits: bf16 rounding changes no greedy choice here
    assert torch.equal(cpu_policy, gpu_policy)


# --------------------------------------------------------------------------------------------------
# host syncs, checkpoints


def test_a_non_finite_loss_between_log_steps_is_caught_before_anything_is_saved(tmp_path,
                                                                              char_data):
    # the loss is read only at log steps and before evaluations, yet the first bad step is named
    cfg = tiny_train_config(tmp_path, char_data, max_iters=5, eval_interval=5, warmup_iters=0)
    train.main(cfg)
    before = dir_snapshot(tmp_path)
    diverging = dataclasses.replace(cfg, init_from='resume', max_iters=10, learning_rate=1e30,
                                    decay_lr=False, grad_clip=0.0, log_interval=4)
    with pytest.raises(UserError, match=r"the loss is not finite at iter 7 \(lr 1.00e\+30\)"):
        train.main(diverging)
    after = dir_snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != 'metrics.jsonl'} == \
        {k: v for k, v in before.items() if k != 'metrics.jsonl'}


def test_keep_prev_checkpoint_false_keeps_one_checkpoint_less(tmp_path, char_data):
    train.main(tiny_train_config(tmp_path, char_data, max_iters=10, eval_interval=5,
                                 keep_prev_checkpoint=False))
    assert sorted(os.listdir(tmp_path)) == ['best.pt', 'ckpt.pt', 'metrics.jsonl']


def test_a_checkpoint_loads_without_a_random_init_and_keeps_its_tied_and_rotary_parts(
        tmp_path, char_data, monkeypatch):
    train.main(tiny_train_config(tmp_path, char_data, max_iters=2, eval_interval=2, rotary=True))
    ckpt = load_checkpoint(os.path.join(tmp_path, 'ckpt.pt'))
    reference = model_from_checkpoint(ckpt).eval()

    normal_ = torch.nn.init.normal_

    def init_on_meta_only(tensor, *args, **kwargs):  # the init runs on shapes, never on memory
        assert tensor.device.type == 'meta', "a checkpoint's weights are not initialised first"
        return normal_(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.nn.init, 'normal_', init_on_meta_only)
    model = model_from_checkpoint(ckpt).eval()
    assert model.transformer.wte.weight is model.lm_head.weight  # one Parameter, as trained
    assert model.rotary_cos.device.type == 'cpu'  # rebuilt, not left on the meta device
    idx = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, idx)[0], reference(idx, idx)[0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# the GPU check script, dry run


@pytest.mark.slow
def test_the_gpu_check_script_runs_end_to_end_on_the_cpu(tmp_path, shakespeare_text):
    from conftest import SHAKESPEARE
    r = run_script('scripts/gpu_check.py', '--cpu=True', f'--input={SHAKESPEARE}',
                   f'--work_dir={tmp_path}', timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    table = [line for line in r.stdout.splitlines() if line.startswith('| ')][2:]
    assert len(table) == 11 and all(' | ok | ' in line for line in table), table
    assert os.path.isfile(tmp_path / 'gpu_check.log')
