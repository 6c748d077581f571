"""The 2DMSE fine-tuning objective (2D Matryoshka Sentence Embeddings, Li et al. 2024), here
as self-distillation from the frozen original model, and its training loop (progress bar;
DistributedDataParallel when ``torch.distributed`` is initialized, e.g. under ``torchrun``).

Each step draws a shallow layer ``i`` uniformly from 1..L-1 and a dimension ``d`` uniformly
from the truncated sizes (< D), and sums the paper's terms, here with unit weights: the loss at
the last layer and at layer ``i``, each at full and at truncated dimensions, plus the KL
alignment of the shallow layer to the last one:

    loss = l(L, D) + l(L, d) + l(i, D) + l(i, d) + kl_weight * KL(P_L || P_i)
    l(layer, d) = mean over the batch of 1 - cos(e_{layer,d}, normalize(t[:d]))
    P_layer     = for each sentence, softmax over the other sentences of the batch of
                  cos(e_{layer,D}, e'_{layer,D}) / temperature      (P_L detached)

``e_{layer,d}`` is the student's elastic embedding, ``t`` the teacher's (the original model's)
full embedding. The paper's per-(layer, dim) loss is its supervised sentence-embedding loss on
labelled pairs; without labels, the cosine to the teacher is the distillation target and is the quantity
the experiment reports. Truncating the teacher to ``d`` makes the target the original model's
own d-dimensional embedding, so the last layer's two terms start at zero and only pull back when
training the shallow exits moves the blocks they share with it: the trade-off 2DMSE balances.
The last layer's similarity distribution is detached so that the shallow layer aligns to it
and not the reverse; each sentence's similarity to itself (always 1) is left out of both.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, Iterator, List, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from leanformer.layers.elastic_embeddings import ElasticEncoder, check_dim, elastic_embedding
from leanformer.training import train


def distillation_loss(pooled: Tensor, teacher: Tensor, dim: int) -> Tensor:
    """``l(layer, dim)``: mean ``1 - cos`` between the student's pooled ``[B, D]`` truncated to
    ``dim`` and the teacher's full embedding ``[B, D]`` truncated to ``dim``."""
    return (1 - (elastic_embedding(pooled, dim) * elastic_embedding(teacher, dim)).sum(-1)).mean()


def alignment_kl(shallow: Tensor, last: Tensor, temperature: float) -> Tensor:
    """``KL(P_last || P_shallow)`` of the in-batch similarity distributions of two layers'
    pooled ``[B, D]`` (full dimension), averaged over the batch; ``last`` is the target."""
    B = shallow.shape[0]
    if B < 3:
        raise ValueError(f"the KL alignment needs a batch of at least 3 sentences, got {B}")
    off_diagonal = ~torch.eye(B, dtype=torch.bool, device=shallow.device)

    def log_probs(pooled):
        e = F.normalize(pooled, dim=-1)
        return F.log_softmax((e @ e.T / temperature)[off_diagonal].view(B, B - 1), dim=-1)

    return F.kl_div(log_probs(shallow), log_probs(last.detach()), reduction="batchmean", log_target=True)


def matryoshka_2d_loss(pooled: Tensor, teacher: Tensor, dim: int, *, kl_weight: float = 1.0,
                       temperature: float = 0.05) -> Tensor:
    """The 2DMSE loss of one step. ``pooled [2, B, D]``: the student's mean-pooled hidden
    states at the sampled shallow layer (index 0) and at the last layer (index 1), as
    ``ElasticEncoder(..., layers=[i, L])`` returns them; ``teacher [B, D]``: the original
    model's embeddings; ``dim``: the sampled truncated size."""
    if pooled.dim() != 3 or pooled.shape[0] != 2:
        raise ValueError(f"pooled must be [2, B, D] (shallow layer, last layer), got {tuple(pooled.shape)}")
    if teacher.shape != pooled.shape[1:]:
        raise ValueError(f"teacher must be [B, D] = {list(pooled.shape[1:])}, got {tuple(teacher.shape)}")
    D = pooled.shape[-1]
    check_dim(dim, D)
    shallow, last = pooled
    loss = sum(distillation_loss(p, teacher, d) for p in (last, shallow) for d in (D, dim))
    return loss + kl_weight * alignment_kl(shallow, last, temperature)


def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distill_batches(student: ElasticEncoder, sentences: Sequence[str], teacher: Tensor, *, batch_size: int,
                    dims: Sequence[int], seed: int) -> Iterator[dict]:
    """Endless training batches from this rank's share of the sentences: the tokenized
    sentences, their teacher embeddings, and the step's sampled shallow layer and dimension."""
    rank, world = _rank_and_world()
    shard = list(range(rank, len(sentences), world))
    if len(shard) < batch_size:
        raise ValueError(f"{len(sentences)} sentences over {world} rank(s) leave {len(shard)} per rank, "
                         f"fewer than batch_size ({batch_size})")
    rng = random.Random(seed * 1000 + rank)
    device = next(student.parameters()).device
    while True:
        idx = rng.sample(shard, batch_size)
        enc = student.model.tokenizer([sentences[i] for i in idx])
        yield {"inputs": {k: v.to(device) for k, v in enc.items()}, "teacher": teacher[idx].to(device),
               "layer": rng.randint(1, student.num_layers - 1), "dim": rng.choice(list(dims))}


def train_2dmse(student: ElasticEncoder, sentences: Sequence[str], teacher: Tensor, *, steps: int,
                evaluate: Callable[[ElasticEncoder], Dict[str, float]], eval_every: int, batch_size: int = 32,
                dims: Sequence[int] = (32, 64, 128, 256), lr: float = 5e-5, kl_weight: float = 1.0,
                temperature: float = 0.05, seed: int = 0) -> List[dict]:
    """Fine-tunes ``student`` in place with :func:`matryoshka_2d_loss` against ``teacher [N, D]``,
    the frozen original model's embeddings of ``sentences``; returns the history of
    ``evaluate(student)`` (see :func:`leanformer.training.train`). Under an initialized
    ``torch.distributed``, each rank trains on its share of the sentences under
    DistributedDataParallel (every parameter takes part in every step: the last layer always
    runs)."""
    if student.num_layers < 2:
        raise ValueError("2DMSE needs at least 2 layers (a shallow one and the last)")
    if teacher.shape != (len(sentences), student.hidden_size):
        raise ValueError(f"teacher must be [N, D] = [{len(sentences)}, {student.hidden_size}], "
                         f"got {tuple(teacher.shape)}")
    dims = [check_dim(d, student.hidden_size) for d in dims]
    if not dims or max(dims) >= student.hidden_size:
        raise ValueError(f"dims must be truncated sizes below {student.hidden_size}, got {dims}")
    _, world = _rank_and_world()
    model: nn.Module = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student)
    last = student.num_layers

    def loss_fn(m, batch):
        pooled = m(**batch["inputs"], layers=[batch["layer"], last])
        return matryoshka_2d_loss(pooled, batch["teacher"], batch["dim"], kl_weight=kl_weight,
                                  temperature=temperature)

    batches = distill_batches(student, sentences, teacher, batch_size=batch_size, dims=dims, seed=seed)
    return train(model, batches, loss_fn, steps=steps, lr=lr, evaluate=lambda m: evaluate(student),
                 eval_every=eval_every, weight_decay=0.01, warmup=max(1, steps // 10), desc="2dmse")
