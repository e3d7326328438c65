"""training_curves.png: loss, reward accuracy, reward margin (train and eval) and the two KL curves."""
from __future__ import annotations

import logging

_log = logging.getLogger("fasttrdpo")


def plot_metrics(history: list[dict], path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log.warning("matplotlib is not installed: no plot (pip install 'fasttrdpo[plot]')")
        return None
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [("loss", "eval_loss", "loss"), ("rewards/accuracies", "eval_rewards/accuracies", "reward accuracy"),
              ("rewards/margins", "eval_rewards/margins", "reward margin")]
    if train and "rewards/accuracies" not in train[0]:  # KTO: no pairs to rank; its batch KL estimate instead
        panels[1] = ("kl", "eval_kl", "KTO KL estimate (z)")
    for ax, (k_train, k_eval, title) in zip(axes, panels):
        pts = [(r["step"], r[k_train]) for r in train if k_train in r]
        if pts:
            ax.plot(*zip(*pts), label="train")
        pts = [(r["step"], r[k_eval]) for r in evals if k_eval in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label="eval")
        init_key = k_eval.replace("eval_rewards/", "eval_init_rewards/")
        pts = [(r["step"], r[init_key]) for r in evals if init_key in r]
        if pts and init_key != k_eval:
            ax.plot(*zip(*pts), "s--", label="eval, vs initial model")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend()
    ax = axes[3]
    for key, label in (("eval_kl/ref", "KL(policy || reference)"), ("eval_kl/init", "KL(policy || initial)")):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label=label)
    ax.set_title("per-token KL on eval completions")
    ax.set_xlabel("optimizer step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
