"""Direct Preference Optimization: answer log-probabilities, the reference model's, the loss and its metrics.

    policy = pair_logps(model, inputs, targets)                  # [B, 2] summed answer log-probs (chosen, rejected)
    reference = reference_logps(model, batches, len(pairs), device, precision)   # [N, 2], once, before training
    losses, chosen, rejected = dpo_losses(policy, reference[index], answer_tokens(targets), beta=0.1, kind="sigmoid")

With r = log pi(y|x) - log pi_ref(y|x) summed over the answer tokens, for the chosen (c) and rejected (r) answers:
- sigmoid (Rafailov et al. 2023): loss = -log sigmoid(beta * (r_c - r_r))
- ipo (Azar et al. 2023, length-normalised as in trl): loss = (r_c / n_c - r_r / n_r - 1 / (2 beta))^2, n = the
  answer's token count
- rewards: beta * r_c and beta * r_r; margin = their difference; accuracy = the share of pairs with margin > 0.
- sft_weight alpha > 0 (RPO, Pang et al. 2024; trl's `rpo_alpha`): each pair's loss gains alpha * NLL_c, the policy's
  mean negative log-likelihood per token of the batch's chosen answers (their tokens pooled, as trl does), which keeps
  DPO from pushing the chosen answers' likelihood down along with the rejected ones'.

The reference is the starting model, frozen. Its log-probabilities never change, so they are computed once for every
pair before training (`reference_logps`, in eval mode, adapters off): a full fine-tune needs no second copy of the
model in memory, a LoRA run uses the same weights with its adapters disabled, and no step pays a second forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ownllm.data.instructions import IGNORE
from ownllm.device import autocast
from ownllm.errors import OwnLLMError
from ownllm.lora import adapters_disabled

LOSSES = ("sigmoid", "ipo")
METRICS = ("loss", "rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "nll_chosen")


def pair_logps(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Summed log-probabilities [B, 2] of the answer tokens (targets != IGNORE) of [B, 2, T] pair batches."""
    pairs, two, width = inputs.shape
    logits = model(inputs.reshape(pairs * two, width)).float()
    flat = targets.reshape(pairs * two, width)
    token_logps = -F.cross_entropy(logits.transpose(1, 2), flat.clamp(min=0), reduction="none")
    return (token_logps * (flat != IGNORE)).sum(dim=-1).view(pairs, two)


def answer_tokens(targets: Tensor) -> Tensor:
    """Counted answer tokens [B, 2] of [B, 2, T] targets."""
    return (targets != IGNORE).sum(dim=-1)


def check_loss_kind(kind: str, beta: float, sft_weight: float = 0.0) -> None:
    if kind not in LOSSES:
        raise OwnLLMError(f"--loss must be one of {', '.join(LOSSES)}, not {kind!r}")
    if not beta > 0:
        raise OwnLLMError("--beta must be positive")
    if not 0 <= sft_weight < math.inf:
        raise OwnLLMError(f"--sft-weight must be 0 or more, not {sft_weight}")


def chosen_nll(policy: Tensor, counts: Tensor) -> Tensor:
    """Mean negative log-likelihood per token of the chosen answers, their tokens pooled over the pairs, from summed
    log-probs [B, 2] and token counts [B, 2]."""
    return -policy[:, 0].sum() / counts[:, 0].sum().clamp(min=1).to(policy.dtype)


def dpo_losses(policy: Tensor, reference: Tensor, counts: Tensor, beta: float, kind: str = "sigmoid",
               sft_weight: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses [B] and rewards of the chosen and rejected answers [B] (detached) from summed log-probs
    [B, 2] of the policy and the reference and the answers' token counts [B, 2]; `sft_weight` adds that much of the
    chosen answers' NLL (`chosen_nll`) to every pair's loss."""
    ratios = policy - reference
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1]))
    elif kind == "ipo":
        normalised = ratios / counts.clamp(min=1).to(ratios.dtype)
        losses = (normalised[:, 0] - normalised[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise OwnLLMError(f"--loss must be one of {', '.join(LOSSES)}, not {kind!r}")
    if sft_weight:
        losses = losses + sft_weight * chosen_nll(policy, counts)
    rewards = beta * ratios.detach()
    return losses, rewards[:, 0], rewards[:, 1]


def pair_stats(losses: Tensor, chosen: Tensor, rejected: Tensor, policy: Tensor, counts: Tensor) -> dict[str, float]:
    """`METRICS`: means over pairs of the loss, rewards_chosen, rewards_rejected, reward_margin and
    preference_accuracy; nll_chosen (`chosen_nll`) from the policy's summed log-probs and the token counts [B, 2]."""
    margin = chosen - rejected
    return {"loss": losses.mean().item(), "rewards_chosen": chosen.mean().item(),
            "rewards_rejected": rejected.mean().item(), "reward_margin": margin.mean().item(),
            "preference_accuracy": (margin > 0).float().mean().item(), "nll_chosen": chosen_nll(policy, counts).item()}


@torch.no_grad()
def logps_of_pairs(model: nn.Module, batches: Iterable[Sequence[Tensor]], n_pairs: int, device: torch.device,
                   precision: str, desc: str | None = None) -> Tensor:
    """Summed answer log-probs [n_pairs, 2] of every pair in `batches` (each ending with the pairs' indices), in
    eval mode, on the CPU in float32."""
    was_training = model.training
    model.eval()
    out = torch.full((n_pairs, 2), float("nan"))
    batches = list(batches)
    for batch in tqdm(batches, desc=desc, disable=desc is None, unit="batch", leave=False):
        with autocast(device, precision):
            logps = pair_logps(model, batch[0].to(device), batch[1].to(device))
        out[batch[-1]] = logps.float().cpu()
    model.train(was_training)
    return out


def reference_logps(model: nn.Module, batches: Iterable[Sequence[Tensor]], n_pairs: int, device: torch.device,
                    precision: str, desc: str | None = None) -> Tensor:
    """The reference model's log-probs [n_pairs, 2]: `model` with its LoRA adapters (if any) disabled."""
    with adapters_disabled(model):
        return logps_of_pairs(model, batches, n_pairs, device, precision, desc)


def counts_of_pairs(batches: Iterable[Sequence[Tensor]], n_pairs: int) -> Tensor:
    """Answer token counts [n_pairs, 2] of every pair in `batches` (each ending with the pairs' indices), float32."""
    counts = torch.zeros(n_pairs, 2)
    for batch in batches:
        counts[batch[-1]] = answer_tokens(batch[1]).to(counts.dtype)
    return counts


def evaluate_pairs(model: nn.Module, batches: Sequence[Sequence[Tensor]], reference: Tensor, beta: float, kind: str,
                   device: torch.device, precision: str, sft_weight: float = 0.0) -> dict[str, float]:
    """DPO metrics (`METRICS`) of the model over every pair in `batches` against the reference log-probs."""
    policy = logps_of_pairs(model, batches, reference.shape[0], device, precision)
    counts = counts_of_pairs(batches, reference.shape[0])
    seen = ~policy.isnan().any(dim=1)
    policy, reference, counts = policy[seen], reference[seen], counts[seen]
    return pair_stats(*dpo_losses(policy, reference, counts, beta, kind, sft_weight), policy, counts)
