"""
Optimizers: AdamW with GPT-2's parameter groups (Loshchilov & Hutter 2019; Radford et al. 2019), and
Muon (Jordan 2024) for the hidden matrices, chained with AdamW for the rest.
"""

import inspect

import torch

from nanogpt.errors import UserError


def configure_optimizers(model, cfg, device_type):
    """cfg.optimizer='adamw': AdamW for every parameter; 'muon': Muon for the blocks' matrices and
    AdamW for the rest (embeddings, head, gains, biases), stepped together as one ChainedOptimizer.
    cfg holds train.py's optimizer knobs: weight_decay, learning_rate, beta1, beta2, muon_lr,
    muon_momentum."""
    params = [p for p in model.parameters() if p.requires_grad]
    muon = []
    if cfg.optimizer == 'muon':
        # Muon orthogonalises a matrix's update, which suits the hidden layers' linear maps; the
        # embeddings and head are lookups/readouts of tokens, trained best by Adam (Jordan 2024).
        muon = [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]
    elif cfg.optimizer != 'adamw':
        raise UserError(f"unknown optimizer {cfg.optimizer!r} (use 'adamw' or 'muon')")
    # Decay the matrices and embeddings (every parameter of 2+ dimensions); biases and LayerNorm
    # gains keep weight_decay 0, as decaying them only pulls them away from their useful values.
    decay = [p for p in params if p.dim() >= 2 and all(p is not q for q in muon)]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{'params': decay, 'weight_decay': cfg.weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    # fused kernels update all parameters in a few launches
    # instead of ~10 small ops per tensor (CUDA and CPU)
    fused = (device_type in ('cuda', 'cpu')
             and 'fused' in inspect.signature(torch.optim.AdamW).parameters)
    adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                              **({'fused': True} if fused else {}))
    if not muon:
        return adamw
    # lr_scale: the training loop sets each group's lr to the schedule's lr times this, so Muon
    # follows the same warm-up and decay at its own (much larger) peak
    muon = Muon([{'params': muon, 'lr_scale': cfg.muon_lr / cfg.learning_rate}], lr=cfg.muon_lr,
                weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
    return ChainedOptimizer(muon, adamw)


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan 2024, kellerjordan.github.io/posts/muon): SGD with Nesterov momentum
    whose update of each matrix is orthogonalised, i.e. replaced by U V^T of its SVD U S V^T, so
    that every direction moves by the same amount. A quintic Newton-Schulz iteration approximates
    U V^T with matmuls only.
    The same algorithm as torch.optim.Muon, whose iteration always runs in bf16, which is slow on
    CPUs without bf16 matmul units (docs/speed.md); here it runs in fp32 off CUDA."""

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      ns_steps=ns_steps))

    @staticmethod
    def orthogonalise(G, steps):
        # Jordan's coefficients: a steep slope at 0, s -> [~0.7, ~1.2]
        a, b, c = 3.4445, -4.7750, 2.0315
        X = G.bfloat16() if G.is_cuda else G.float()
        if G.size(0) > G.size(1):
            X = X.T  # iterate on the wide side: X X^T is the smaller Gram matrix
        X = X / (X.norm() + 1e-7)  # Frobenius norm >= spectral norm: singular values now <= 1
        for _ in range(steps):
            # X <- a X + b (X X^T) X + c (X X^T)^2 X: a quintic polynomial of each singular value
            A = X @ X.T
            B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A A in one call
            X = torch.addmm(X, B, X, beta=a)  # a X + B X
        return (X.T if G.size(0) > G.size(1) else X).to(G.dtype)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(p)
                buf = state['momentum_buffer']
                buf.mul_(group['momentum']).add_(p.grad)
                g = p.grad.add(buf, alpha=group['momentum'])  # Nesterov
                update = self.orthogonalise(g, group['ns_steps'])
                p.mul_(1 - group['lr'] * group['weight_decay'])  # decoupled weight decay
                # a tall matrix's rows are longer than unit: scale so each row moves alike
                # (Jordan's choice)
                p.add_(update, alpha=-group['lr'] * max(1, p.size(0) / p.size(1)) ** 0.5)


class ChainedOptimizer:
    """Several torch optimizers (each owning its own parameters) used as one: steps, zero_grad,
    param_groups and a state_dict of plain tensors, as the training loop, GradScaler and
    checkpoints expect."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {'chained': [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict):
        if len(state_dict.get('chained', ())) != len(self.optimizers):
            raise UserError("the checkpoint's optimizer state is of another optimizer: "
                            "resume with the same --optimizer")
        for opt, sd in zip(self.optimizers, state_dict['chained']):
            opt.load_state_dict(sd)
