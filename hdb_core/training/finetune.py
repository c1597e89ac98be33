"""Rank-relaxed fast finetuning of a LiDB (HyperDreamBooth stage 2), independent of any UI.

The loop only knows LiDB train matrices: it relaxes the start to `relaxed_rank`
(so step 0 reproduces the start's dW exactly), then optimises A_train/B_train
with a loss the caller supplies. How the residuals reach a model and what the
loss is (the diffusion objective of a ComfyUI model, a toy regression in a
test) is the caller's business, which keeps this loop testable with plain torch.

The caller's loss gets, for every layer, the differentiable LoRA factors
(down [r, in], up [out, r]) of this step, already on the training device.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from hdb_core import defaults
from hdb_core.errors import HDBError
from hdb_core.lidb.subspace import IdentitySubspace, rows_of
from hdb_core.lidb.targets import LayerSpec
from hdb_core.lidb.batch import LayerFactors
from hdb_core.lidb.weights import AUX, FREE, RELAXATIONS, LiDB, LiDBConfig
from hdb_core.training.objective import PriorTerm, draw, pick_latents

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[int, Factors, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = defaults.FINETUNE_STEPS
    learning_rate: float = defaults.FINETUNE_LR
    draws_per_step: int = defaults.FINETUNE_DRAWS   # losses (each its own noise and timestep) averaged per step
    relaxed_rank: int = defaults.RELAXED_RANK
    relaxation: str = defaults.RELAXATION       # AUX: new components in the aux subspace; FREE: the paper's
    seed: int = 0
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None   # None: full precision (CPU default)
    loss_scaling: bool = False                  # dynamic loss scaling (needed with fp16 on GPU)
    trainable: frozenset[str] | None = None     # components to optimise ('unet', 'te', ...); None = all
    subspace: IdentitySubspace | None = None    # set: optimise only the start's coefficients in it (no relaxation)


@dataclass
class FinetuneResult:
    lidb: LiDB
    losses: list[float] = field(default_factory=list)


def check_relaxable(start: LiDB, rank: int, relaxation: str = AUX) -> None:
    if relaxation not in RELAXATIONS:
        raise HDBError(f"relaxation must be one of {', '.join(RELAXATIONS)}, not {relaxation!r}.")
    if relaxation == FREE:
        if start.free_down:
            raise HDBError("The starting LiDB already has a free LoRA part (it was finetuned that way); "
                           f"finetune it again with relaxation '{AUX}', or start from its prediction.")
        return
    if rank < start.config.rank:
        raise HDBError(f"The starting LiDB already has rank {start.config.rank}, more than relaxed_rank {rank}; "
                       f"set relaxed_rank to {start.config.rank} or higher.")


def relaxed_start(start: LiDB, rank: int, generator: torch.Generator, relaxation: str = AUX) -> LiDB:
    """The start with room to learn and identical dW: `rank` components in the aux subspace (AUX),
    or the start as it is plus a free LoRA of `rank` outside it (FREE, the paper's relaxation)."""
    check_relaxable(start, rank, relaxation)
    if relaxation == FREE:
        return start.to_float32().with_free_lora(rank, generator)
    return start.relaxed(rank, generator) if rank > start.config.rank else start.to_float32()


def zero_start(layers: Iterable[LayerSpec], rank: int, generator: torch.Generator, relaxation: str = AUX,
               **info) -> LiDB:
    """A LiDB whose dW is zero but which learns from the first step (LoRA-style A random, B zero).

    With the FREE relaxation the aux part is a plain zero (rank 1): the free LoRA added by
    `relaxed_start` is what learns.
    """
    if relaxation == FREE:
        return LiDB.zeros(layers, LiDBConfig(), **info)
    return LiDB.trainable_start(layers, LiDBConfig(rank=rank), generator, **info)


class TrainableLiDB(torch.nn.Module):
    """A LiDB's train matrices (and free LoRA factors) as parameters, its aux bases on the device.

    With `train_aux` False the aux-factored part is kept as it is (the paper's relaxation:
    only the free LoRA part learns). `grouped`: see `LayerFactors`.
    """

    def __init__(self, lidb: LiDB, device: torch.device, trainable: frozenset[str] | None = None,
                 train_aux: bool = True, grouped: bool | None = None):
        super().__init__()
        self.build = LayerFactors(lidb.config, lidb.layers, device, grouped)
        self.template = lidb
        self.names = [s.name for s in lidb.layers]
        self.a_train, self.b_train = torch.nn.ParameterList(), torch.nn.ParameterList()
        self.free_down, self.free_up = torch.nn.ParameterList(), torch.nn.ParameterList()

        def param(t: torch.Tensor, learn: bool) -> torch.nn.Parameter:
            return torch.nn.Parameter(t.detach().float().to(device).clone(), requires_grad=learn)

        for spec in lidb.layers:
            learn = trainable is None or spec.component in trainable
            self.a_train.append(param(lidb.a_train[spec.name], learn and train_aux))
            self.b_train.append(param(lidb.b_train[spec.name], learn and train_aux))
            if lidb.free_down:
                self.free_down.append(param(lidb.free_down[spec.name], learn))
                self.free_up.append(param(lidb.free_up[spec.name], learn))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (down [r, in], up [out, r]); differentiable in the trainable matrices."""
        out = {}
        for i, (name, (down, up)) in enumerate(zip(self.names, self.build(list(self.a_train), list(self.b_train)))):
            if len(self.free_down):
                down = torch.cat([down, self.free_down[i]], dim=0)
                up = torch.cat([up, self.free_up[i]], dim=1)
            out[name] = (down, up)
        return out

    def to_lidb(self, **info) -> LiDB:
        cpu = lambda params: {n: p.detach().float().cpu().clone() for n, p in zip(self.names, params)}  # noqa: E731
        free = (cpu(self.free_down), cpu(self.free_up)) if len(self.free_down) else ({}, {})
        return self.template.with_tensors(cpu(self.a_train), cpu(self.b_train), free=free, **info)


class SubspaceLiDB(torch.nn.Module):
    """The start plus a move inside an identity subspace: the k coefficients are the only parameters.

    Coefficients start at zero, so step 0 is the start exactly, whether or not it lies in the subspace
    (a hypernetwork's prediction keeps what it has outside it). Layers of components not in `trainable`
    do not move.
    """

    def __init__(self, start: LiDB, subspace: IdentitySubspace, device: torch.device,
                 trainable: frozenset[str] | None = None, grouped: bool | None = None):
        super().__init__()
        self.build = LayerFactors(start.config, start.layers, device, grouped)
        subspace.check_fits(start)
        self.template, self.subspace = start, subspace
        directions = subspace.directions
        if trainable is not None:      # the rows of frozen components' layers stay put
            moves = lambda t: {s.name: torch.full_like(t[s.name], float(s.component in trainable))  # noqa: E731
                               for s in start.layers}
            directions = directions * rows_of([start.with_tensors(moves(start.a_train), moves(start.b_train))])
        self.register_buffer("start_row", rows_of([start]).to(device))
        self.register_buffer("directions", directions.to(device))
        self.coefficients = torch.nn.Parameter(torch.zeros(1, subspace.components, device=device))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.coefficients] if self.directions.abs().sum() > 0 else []

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        a, b = self.subspace.train_matrices(self.start_row + self.coefficients @ self.directions)
        names = [s.name for s in self.template.layers]
        return dict(zip(names, self.build([a[n][0] for n in names], [b[n][0] for n in names])))

    def to_lidb(self, **info) -> LiDB:
        row = (self.start_row + self.coefficients @ self.directions).detach().float().cpu()
        a, b = self.subspace.train_matrices(row)
        return self.template.with_tensors({k: v[0].clone() for k, v in a.items()},
                                          {k: v[0].clone() for k, v in b.items()}, **info)


def finetune(start: LiDB, loss_fn: LossFn, settings: FinetuneSettings,
             progress: Callable[[int, int, float], None] | None = None,
             check_cancel: Callable[[], None] | None = None, **info) -> FinetuneResult:
    """Relax `start` to settings.relaxed_rank and optimise it for settings.steps steps of `loss_fn`;
    with settings.subspace, optimise instead its move within that identity subspace (`SubspaceLiDB`).

    `loss_fn(step, factors, generator)` returns a scalar loss; `generator` is a CPU
    generator seeded with settings.seed, for the caller's noise and timesteps, so a
    run is reproducible. Each step calls it settings.draws_per_step times and follows
    their mean, one backward pass after each (memory as for one draw): a 40-step run
    from a prediction ends noisy with single draws (docs/evidence.md). `check_cancel`
    runs before every draw and may raise to stop; `progress(step, steps, loss)` runs
    after every step. A non-finite loss or
    weights stop the run with an HDBError; NaN weights are never returned.
    """
    if settings.steps < 1:
        raise HDBError(f"steps is {settings.steps}; finetuning needs at least 1 step (40 is the paper's value).")
    if not (settings.learning_rate > 0 and math.isfinite(settings.learning_rate)):
        raise HDBError(f"learning_rate is {settings.learning_rate}; use a positive value such as 1e-3.")
    if settings.draws_per_step < 1:
        raise HDBError(f"draws_per_step is {settings.draws_per_step}; use at least 1 "
                       f"({defaults.FINETUNE_DRAWS} is the default).")
    generator = torch.Generator().manual_seed(int(settings.seed))
    if settings.subspace is not None:
        weights = SubspaceLiDB(start, settings.subspace, settings.device, settings.trainable)
    else:
        lidb = relaxed_start(start, settings.relaxed_rank, generator, settings.relaxation)
        weights = TrainableLiDB(lidb, settings.device, settings.trainable, train_aux=settings.relaxation == AUX)
    params = weights.trainable_parameters()
    if not params:
        raise HDBError("Nothing to train: the LiDB has no layers on the components being trained; "
                       "connect a model whose attention layers the LiDB covers.")
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0, foreach=True)
    scaler = torch.amp.GradScaler(settings.device.type, enabled=settings.loss_scaling)
    autocast = (torch.autocast(settings.device.type, dtype=settings.autocast_dtype)
                if settings.autocast_dtype is not None else contextlib.nullcontext())
    losses: list[float] = []
    for step in range(settings.steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(settings.draws_per_step):
            if check_cancel is not None:
                check_cancel()
            with autocast:
                loss = loss_fn(step, weights.factors(), generator)
            value = float(loss.detach().float())
            if not math.isfinite(value):
                raise HDBError(f"The finetuning loss became {value} at step {step + 1} of {settings.steps}; "
                               f"lower learning_rate (now {settings.learning_rate:g}) or check that the model "
                               f"and VAE produce finite outputs.")
            scaler.scale(loss.float() / settings.draws_per_step).backward()
            total += value
        scaler.step(optimizer)
        scaler.update()
        losses.append(total / settings.draws_per_step)
        if progress is not None:
            progress(step + 1, settings.steps, losses[-1])
    if not all(torch.isfinite(p).all() for p in weights.parameters()):
        raise HDBError(f"The finetuned weights became non-finite; lower learning_rate "
                       f"(now {settings.learning_rate:g}) and run again.")
    return FinetuneResult(weights.to_lidb(**info), losses)


def diffusers_loss_fn(base, injector, latents: torch.Tensor, input_ids: torch.Tensor, mirror: bool,
                      draws: int = 1, prior_ids: torch.Tensor | None = None, prior_weight: float = 0.0) -> LossFn:
    """The loss `hdb finetune` optimises on a diffusers `BaseModel`, as a `finetune` loss function.

    Each call draws (through `objective.draw`) one of the photos' latents [K, 2, C, h, w],
    its mirror or not, a timestep and noise from the loop's generator, hands this step's
    factors to `injector` and returns the model's denoising loss. With `draws` > 1 it makes
    that many draws in turn and returns their mean from one batch: with `draws_per_step=1`
    the same step as `draws_per_step=draws` with single draws, in less time and more memory
    (the evidence bench's tiny model). With `prior_weight` > 0 it adds that times the prior
    term (`objective`) for the class prompt `prior_ids` on the same noised latents: one more
    forward and backward, and one forward without the residual. Public so that experiments
    (bench/evidence) optimise exactly what the command does.
    """
    device = latents.device
    prior = PriorTerm(base, injector, prior_ids, per_sample=False) if prior_weight else None

    def loss_fn(step, factors, generator):
        picked = [draw(generator, latents.shape[0], mirror, base.num_timesteps, latents.shape[2:])
                  for _ in range(draws)]
        x0 = torch.stack([pick_latents(latents, d) for d in picked])
        noise = torch.stack([d.noise for d in picked]).to(device)
        t = torch.tensor([d.timestep for d in picked], device=device)
        prior_loss = prior(factors, x0, noise, t).mean() if prior else 0.0
        injector.set_factors(factors)
        context = base.text_encoder(input_ids)[0].expand(draws, -1, -1)
        return base.loss(x0, noise, t, context).mean() + prior_weight * prior_loss

    return loss_fn
