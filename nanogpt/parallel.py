"""
Training on several processes (under torchrun): DistributedDataParallel, or FSDP2 (fully sharded
data parallel, torch.distributed.fsdp.fully_shard).

DDP keeps a whole copy of the model, its gradients and the optimizer state on every process and
all-reduces the gradients. FSDP shards all three: each of N processes holds 1/N of every
parameter, gathers a block's full weights just before that block runs (forward, and again in
backward) and frees them after, and reduce-scatters the gradients so that each process gets the
mean gradient of its own shard, which its optimizer steps. Memory per process for the states:
~1/N of DDP's, for the price of gathering the weights twice per micro-step (Zhao et al. 2023,
"PyTorch FSDP"). The data, the batches of each process and the mean gradient are DDP's, so both
train the same model (tests/test_fsdp.py).

Checkpoints hold the full state, gathered to process 0 when saved, in the single-process format:
sample.py, eval.py and a resume on any number of processes read them as they are.
"""

import sys

import torch

# FSDP's modules are imported where used: they take a second to import (torch.distributed.tensor,
# checkpoint, dynamo), which every script loading a checkpoint would otherwise pay at start


def full_state_options():
    """Full (unsharded) tensors, on the CPU of process 0 only: a gathered gpt2-xl would not fit
    twice on a GPU, and the other processes do not save."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def place(model, dev, world_size, parallelism):
    """Put the model on dev (device.setup's): whole (one process, or DDP), or sharded across the
    processes (FSDP). Before the optimizer is made: FSDP's sharded parameters are new tensors."""
    if world_size > 1 and parallelism == 'fsdp':
        shard(model, dev.type, world_size)  # moves each shard to the device
    else:
        model.to(dev.device)


def wrap(model, dev, world_size, parallelism, verbose=True):
    """The module the training loop calls: compiled if dev says so, under DDP on several processes
    (all-reducing gradients); an FSDP model is called as it is (sharding hooked into it)."""
    if dev.compile:
        if verbose:
            print("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if world_size > 1 and parallelism == 'ddp':
        # broadcast_buffers=False: the only buffers (rotary tables) are the same on every process
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[int(dev.device.split(':')[1])] if dev.type == 'cuda' else None,
            broadcast_buffers=False)
    return model


def shard(model, device_type, world_size):
    """Apply FSDP2 to the GPT, in place: each block is one unit that is gathered, run and freed on
    its own (so at most one block's full weights are held at a time besides the root's), and the
    root holds the rest (embeddings, final norm, head). Parameters move to this process's device as
    they are sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device_type, (world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model):
    dtensor = sys.modules.get('torch.distributed.tensor')  # not imported yet: nothing is sharded
    return dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters())


def state_dicts(model, optimizer):
    """The model's and the optimizer's state dicts as a checkpoint holds them. Under FSDP a
    collective (every process must call it): process 0 gets the full state, the others empty
    dicts; the optimizer's, keyed by parameter names there, is keyed by position here, as
    optimizer.state_dict() is."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    model_state = get_model_state_dict(model, options=full_state_options())
    optim_state = get_optimizer_state_dict(model, optimizer, options=full_state_options())
    if not optim_state:
        return model_state, optim_state
    ids = {name: i for i, name in enumerate(n for g in optim_state['param_groups']
                                            for n in g['params'])}
    return model_state, {
        'state': {ids[n]: s for n, s in optim_state['state'].items()},
        'param_groups': [{**g, 'params': [ids[n] for n in g['params']]}
                         for g in optim_state['param_groups']]}


def load_optimizer_state(model, optimizer, state):
    """optimizer.load_state_dict(state), also for an FSDP model: each process keeps its shard of
    the full, position-keyed state every process has read from the checkpoint."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    # the parameter names of the optimizer's positions, in order
    names = {p: n for n, p in model.named_parameters()}
    order = [names[p] for g in optimizer.param_groups for p in g['params']]
    state = {'state': {order[i]: s for i, s in state['state'].items()},
             'param_groups': [{**g, 'params': [order[i] for i in g['params']]}
                              for g in state['param_groups']]}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
