"""End to end: TRDPOLoss trains a tiny GPTNeoX (Pythia architecture, random init) on a fixed preference set.

The reference is a frozen copy of the initial policy, so every reward starts at exactly 0 (accuracy 0:
TRL counts chosen > rejected strictly). 30 Adam steps on the loss must separate chosen from rejected
on every pair but at most 10%: a wrong gradient sign or a broken pairing (rows i and P + i) drives the
accuracy down or leaves it at chance, and a gradient that does not reach the backbone or the lm_head
cannot fit 12 random pairs this fast.
"""
import copy

import pytest
import torch

import fasttrdpo.loss as L
from fasttrdpo.tiny import tiny_model

PAIRS, PROMPT, COMPLETION, VOCAB = 12, 6, 8, 384


def _preference_set(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, VOCAB, (PAIRS, PROMPT), generator=g)
    chosen = torch.randint(2, VOCAB, (PAIRS, COMPLETION), generator=g)
    rejected = torch.randint(2, VOCAB, (PAIRS, COMPLETION), generator=g)
    input_ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])  # [2P, T]
    labels = input_ids.clone()
    labels[:, :PROMPT] = -100  # the prompt is context only
    # vary completion lengths with right padding (pad id 0, ignored) to exercise the masks
    input_ids[PAIRS - 2, -3:] = 0
    labels[PAIRS - 2, -3:] = -100
    input_ids[2 * PAIRS - 1, -2:] = 0
    labels[2 * PAIRS - 1, -2:] = -100
    attention = (input_ids != 0).long()
    return input_ids, attention, labels[:, 1:]  # shifted: label t is what position t predicts


def _hidden(model, input_ids, attention):
    return model.gpt_neox(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_tiny_gptneox_learns_preferences(loss_type):
    torch.manual_seed(0)
    policy = tiny_model(seed=0, hidden_size=64, num_hidden_layers=2)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    input_ids, attention, labels = _preference_set()
    loss_fn = L.TRDPOLoss(beta=0.1, loss_type=loss_type, backend="eager")
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)

    def step(train: bool):
        with torch.set_grad_enabled(train):
            with torch.no_grad():
                ref_h = _hidden(ref, input_ids, attention)
            h = _hidden(policy, input_ids, attention)
            return loss_fn(h, policy.lm_head.weight, labels, ref_h, ref.lm_head.weight)

    first_loss, first = step(False)
    assert float(first["rewards/accuracies"]) == 0.0 and float(first["rewards/margins"]) == 0.0
    for _ in range(30):
        opt.zero_grad()
        loss, _ = step(True)
        loss.backward()
        opt.step()
    last_loss, last = step(False)
    assert float(last["rewards/accuracies"]) > 0.9, last
    assert float(last["rewards/margins"]) > 0
    assert float(last_loss) < float(first_loss)
