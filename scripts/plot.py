"""
Plot training runs: train and val loss (and the learning rate) against tokens seen, from the
metrics.jsonl that train.py writes in each out_dir.

    python scripts/plot.py --out_dir=out-shakespeare-char-cpu
    python scripts/plot.py --out_dir=out-a,out-b --output=compare.png --title="lr 1e-3 vs 3e-3"

Needs matplotlib: pip install -e .[plot]
"""

import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from configurator import cli
from nanogpt.errors import UserError
from nanogpt.run_dir import metrics_path
from nanogpt.run_dir import read_metrics as read_run_metrics


@dataclass
class PlotConfig:
    out_dir: str = 'out'  # a training run's folder, or several separated by commas, to compare
    output: str = 'loss.png'  # the PNG to write
    title: str = ''
    width: int = 1000  # pixels
    height: int = 700  # pixels


def read_metrics(out_dir):
    rows = read_run_metrics(out_dir)
    if not rows:
        raise UserError(f"{metrics_path(out_dir)} is empty: the run has not logged a step yet")
    return rows


def plot(out_dirs, output, title=None, width=1000, height=700):
    """Write a PNG of width x height pixels: losses on top, learning rate below,
    one colour per run."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -e .[plot]") from None
    matplotlib.use('Agg')  # files only, no window
    import matplotlib.pyplot as plt
    dpi = 100
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(width / dpi, height / dpi), dpi=dpi,
                                         sharex=True, gridspec_kw={'height_ratios': [3, 1]})
    for i, out_dir in enumerate(out_dirs):
        rows, color, name = (read_metrics(out_dir), f'C{i}',
                             os.path.basename(os.path.normpath(out_dir)))
        steps = [r for r in rows if 'train_loss' in r]
        evals = [r for r in rows if 'val_loss' in r]
        ax_loss.plot([r['tokens'] for r in steps], [r['train_loss'] for r in steps], color=color,
                     alpha=0.35, linewidth=1, label=f'{name} train (logged steps)')
        ax_loss.plot([r['tokens'] for r in evals], [r['val_loss'] for r in evals], color=color,
                     marker='o', markersize=3, label=f'{name} val')
        ax_lr.plot([r['tokens'] for r in steps], [r['lr'] for r in steps], color=color)
    ax_loss.set_ylabel('loss (nats/token)')
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_loss.set_title(title or 'training runs')
    ax_lr.set_ylabel('learning rate')
    ax_lr.set_xlabel('tokens seen')
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
    print(f"wrote {output} ({width}x{height})")


def check_config(cfg):
    if cfg.width <= 0 or cfg.height <= 0:
        raise UserError(f"width and height must be positive, got {cfg.width}x{cfg.height}")


def main(cfg):
    check_config(cfg)
    plot([d for d in cfg.out_dir.split(',') if d], cfg.output, cfg.title or None, cfg.width,
         cfg.height)


if __name__ == '__main__':
    cli(main, PlotConfig)
