"""The rotational optimizer: AdamW, Lion or SGDM, plain or as rotational variants (docs/design.md §4).

A parameter group is rotational or plain. Plain tensors take the inner rule's step with its
usual weight decay. A rotational tensor W, per neuron w (a slice along the neuron axis, or
the whole tensor), keeps its norm n and rotates by a controlled angle each step:

    u  <- inner direction (no lr, no decay)      s  <- c*s + (1-c)*||u2||^2
    u1 <- u - w <u, w> / ||w||^2                 w1 <- w - eta_r * n * u2 / (sqrt(s / (1-c^t)) + eps)
    u2 <- u1 - mean(u1)   (zero_mean)            w  <- n * centre(w1) / ||centre(w1)||

How it is computed: everything after u is linear in w, u and the all-ones vector, so the
step needs only five sums per neuron (||w||^2, ||u||^2, <u, w>, sum w, sum u). From them a
few vectorised operations on [neurons]-long vectors give per-neuron a, b, c with
w_new = a*w + b*u + c, applied by three foreach ops. The sums are taken from the current
weights every step, so the norm and mean never drift over a long run.

Sharded parameters keep that math exact (docs/design.md §4):
- FSDP2 (DTensor parameters). The step works on local shards. A shard along the neuron axis
  holds whole neurons: per-neuron work stays local and the per-neuron state is a DTensor
  sharded the same way. A shard along another axis (GPT-2's Conv1D, [in, out] sharded on `in`)
  holds part of every neuron: the five sums are all-reduced over the mesh, once per group.
- ZeRO (flat 1-D partitions). `adopt_flat_partition` gives such a parameter its `SegmentMap`:
  the sums are reductions over its blocks, all-reduced as one [6, neurons] vector, and a, b, c are
  applied block by block. The per-neuron state covers all neurons of the flat group.
A rotational tensor the optimizer cannot map to its neurons raises instead of taking the plain rule.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.optim import Optimizer

from pretrain.errors import UserError
from pretrain.optim.equilibrium import equilibrium_rate
from pretrain.optim.hyper import Hyper, KernelRejected
from pretrain.optim.rules import INNER_RULES, Rule
from pretrain.optim.segments import SegmentMap
from pretrain.params import sharded_along_neurons

_TINY = torch.finfo(torch.float32).tiny
# A neuron whose |mean| is below this fraction of its RMS counts as centred already. Centring
# it again would only add rounding noise; skipping it makes re-building the optimizer over
# trained weights (a resume) leave them bit-identical.
_CENTRED_TOL = 1e-6
# On CPU a group is processed in tiles of about this many elements (whole neurons), so that a
# tile's weights, gradients, moments and scratch stay in cache across the ~15 passes of a step:
# 1.7x faster for RV-AdamW on llama-125m than whole groups (benchmarks/bench_optim.py --cpu-chunk 0).
# Accelerators take a whole group at once: fewer kernel launches.
_CPU_CHUNK_NUMEL = 1 << 20


class RotationalOptimizer(Optimizer):
    """AdamW, Lion or SGDM (`rule`), with per-group rotational variants (RVs).

    Param-group options besides the constructor's: `rotational` (None: rotational iff
    weight_decay > 0 and the tensor is a matrix) and `neuron_axis` (default 0; the axis that
    indexes output neurons, 1 for transformers' Conv1D). With rotational off every rule is the
    plain optimizer: AdamW with decoupled decay, Lion as published, SGDM with L2 decay through
    the momentum as torch.optim.SGD.

    Rotational tensors are centred per neuron at construction when `center_init` (already
    centred neurons are left bit-identical). To resume, build the optimizer before loading
    the trained weights and the optimizer state, as usual.
    """

    def __init__(self, params: Iterable[Any], rule: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.9, eps: float = 1e-8,
                 update_norm_decay: float = 0.9, zero_mean: bool = True, per_neuron: bool = True,
                 center_init: bool = True, rotational_eps: float = 1e-8, fused: bool | None = None) -> None:
        defaults = dict(rule=rule, lr=lr, weight_decay=weight_decay, betas=tuple(betas), momentum=momentum, eps=eps,
                        update_norm_decay=update_norm_decay, zero_mean=zero_mean, per_neuron=per_neuron,
                        center_init=center_init, rotational_eps=rotational_eps, rotational=None, neuron_axis=0)
        self._segment_maps: dict[int, SegmentMap] = {}
        # Fused kernels by device type: the Triton step (pretrain/optim/fused.py) for CUDA tensors,
        # the C++ step (pretrain/optim/cpu_fused.py) for CPU ones. None: Triton where it imports,
        # eager on CPU; True: both, required; False: every tensor takes the eager path. Under
        # Triton's interpreter (TRITON_INTERPRET=1, as in tests) True runs Triton on CPU tensors.
        self._kernels: dict[str, Any] = {}
        # Rotation-tracker requests for the next step: id(param) -> (neuron axis, float64 [neurons, 4] rows).
        self._track: dict[int, tuple[int, Tensor]] = {}
        self._plans: dict[tuple, _Plan] = {}  # how a group steps, by (group, its flags, live and tracked tensors)
        self._live: dict[int, tuple[int, ...]] = {}  # id(group) -> ids of the tensors its last step stepped
        self._live_changes = 0  # how often a group stepped other tensors than at its step before
        self._stepped = [0, 0]  # tensors of the last step: [taken by a fused kernel, all]
        self._advanced: list[_StepCounts] = []  # the counters the last step advanced (see `rewind_step`)
        self._all_triton: bool | None = None  # whether every tensor takes the Triton step (None: not known)
        self._fused_required = fused is True
        super().__init__(params, defaults)
        if fused is not False:
            self._kernels = _kernels(fused is True, {p.device.type for g in self.param_groups for p in g["params"]})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # the Triton step reads state with 16-byte loads (fused.table_address)
            for name, value in state.items():
                if isinstance(value, Tensor) and value.dim() and _local(value).data_ptr() % 16:
                    state[name] = value.clone()
        self._plans.clear()  # the state tensors the plans point at were replaced
        self._all_triton = None  # and the groups, with the loaded ones' options

    @torch.no_grad()
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._plans, self._all_triton = {}, None
        group = self.param_groups[-1]
        if group["rule"] not in INNER_RULES:
            raise ValueError(f"unknown rule {group['rule']!r}; expected one of {', '.join(INNER_RULES)}")
        for p in group["params"]:
            if _is_rotational(group, p):
                _check_neuron_axis(group, p)
                self._init_rotational(p, group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._stepped, self._advanced = [0, 0], []
        flags = _DeviceFlags.of(self)
        try:
            for group in self.param_groups:
                self._step_group(group, flags)
        finally:
            self._track = {}
        return loss

    @property
    def takes_device_flags(self) -> bool:
        """Whether `step` can take its skip and gradient divisor as device tensors without reading them:
        set as `found_inf` and `grad_scale` (as torch's fused AdamW takes them from a loss scaler),
        they go into the Triton kernel; tensors that step elsewhere read them on the host.

        False where some tensor steps elsewhere (reading first costs no more then). Decided from the
        groups, never from an earlier step, so a resumed run takes the path the uninterrupted one took
        (the two clip alike only to rounding); a kernel the device's compiler rejects, known only at
        the first step, leaves its tensors reading the flags on the host.
        """
        if self._all_triton is None:  # asked every step: the answer is kept until the groups change
            pairs = [(group, p) for group in self.param_groups for p in group["params"]]
            self._all_triton = bool(pairs) and all(self._takes_triton_step(group, p) for group, p in pairs)
        return self._all_triton

    def _takes_triton_step(self, group: dict[str, Any], p: Tensor) -> bool:
        """Whether `p` goes into a Triton launch (`_fused_plan`, as far as it is known before a step)."""
        from pretrain.optim import fused

        ok, axis = self._kernel_walk(group, p, _is_rotational(group, p))
        return ok and self._kernels.get(_local(p).device.type) is fused and fused.supports(_local(p), None, axis)

    def _kernel_walk(self, group: dict[str, Any], p: Tensor, rot: bool,
                     tracked_axis: int | None = None) -> tuple[bool, int | None]:
        """(whether a fused kernel may step `p` at all, the axis it would walk; None: flat). A rotational
        tensor walks its group's neuron axis; a plain one flat, or the tracker's axis when it is tracked."""
        if rot:
            axis = _axis(group)
            return axis is not None and id(p) not in self._segment_maps and _partial_group(p, axis) is None, axis
        return tracked_axis is None or _partial_group(p, tracked_axis) is None, tracked_axis

    def rewind_step(self) -> None:
        """Take back the step counts of the last step, which its `found_inf` skipped on the device."""
        for steps in self._advanced:
            steps.retreat()
        self._advanced = []

    def fused_covers(self, p: Tensor, axis: int) -> bool:
        """Whether the fused kernel steps `p` and can report its rotation sums along `axis`."""
        kernel = self._kernels.get(_local(p).device.type)
        if kernel is None or id(p) in self._segment_maps:
            return False
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            return False
        rot = _is_rotational(group, p)
        ok, walk = self._kernel_walk(group, p, rot, axis)
        if rot and walk is not None and walk % p.dim() != axis % p.dim():  # it walks its own axis only
            return False
        return ok and kernel.supports(_local(p), None, axis)

    @property
    def fused_fraction(self) -> float:
        """The share of the last step's tensors that a fused kernel stepped (0: all eager, or no step yet)."""
        fused, total = self._stepped
        return fused / total if total else 0.0

    def request_rotation_sums(self, rows: dict[int, tuple[int, Tensor]]) -> None:
        """Have the next step write per-neuron float64 sums |w_t|^2, <w_t, dw>, |dw|^2, |g|^2 into `rows`.

        `rows`: id(param) -> (neuron axis, a contiguous float64 [local neurons, 4] view); every
        param named must satisfy `fused_covers`. The request ends with that step.
        """
        self._track = dict(rows)

    # ------------------------------------------------------------------ state

    def _init_rotational(self, p: Tensor, group: dict[str, Any]) -> None:
        """Store the per-neuron norm n (after centring the neurons, if asked) and a zero s."""
        partial_group = _partial_group(p, _axis(group))
        view = _neuron_major(_local(p), _axis(group))  # a view: centring writes into p
        dims, width = tuple(range(1, view.dim())), view[0].numel() if len(view) else 0

        def neuron_sum(t: Tensor) -> Tensor:  # over the whole neuron, whichever ranks hold it
            return _reduced(t.sum(dim=dims, dtype=torch.float32).view(-1, *[1] * len(dims)), partial_group)

        count = _reduced(torch.full((view.shape[0], *[1] * len(dims)), float(width), device=view.device),
                         partial_group)
        norm = neuron_sum(view.square()).sqrt()
        if group["center_init"]:
            mean = neuron_sum(view) / count.clamp_min(1)
            centred = view - mean
            centred_norm = neuron_sum(centred.square()).sqrt()
            rescaled = centred * torch.where(centred_norm > 0, norm / centred_norm, 0.0)
            off_centre = mean.abs() * count.sqrt() > _CENTRED_TOL * norm
            view.copy_(torch.where(off_centre, rescaled, view))
        state = self.state[p]
        state["neuron_norm"] = _per_neuron_state(p, _axis(group), norm.flatten())
        state["update_norm_avg"] = torch.zeros_like(state["neuron_norm"])

    @torch.no_grad()
    def adopt_flat_partition(self, flat: Tensor, segment_map: SegmentMap, originals: list[Tensor],
                             group_index: int) -> None:
        """Take over a ZeRO flat partition `flat` of param group `group_index` that replaced `originals`.

        The per-neuron norms computed from the full tensors at construction move to `flat`, in the
        map's neuron order; the originals' state is dropped (they are no longer optimised here).
        """
        group = self.param_groups[group_index]
        if not group["per_neuron"] and group["rotational"] is not False:
            raise ValueError("per_neuron=False is not supported on flat (ZeRO) partitions; use per-neuron rotation")
        if group["rotational"] is None:  # decide now, from the original shapes, not the flat one
            kinds = {_is_rotational(group, q) for q in originals}
            if len(kinds) > 1:
                raise ValueError("a flat partition mixes rotational and plain tensors; give its parameter group "
                                 "an explicit `rotational` flag")
            group["rotational"] = kinds.pop() if kinds else False
        state = {} if not group["rotational"] else {
            "neuron_norm": torch.cat([self.state[q]["neuron_norm"] for q in originals]).to(flat.device),
            "update_norm_avg": torch.zeros(segment_map.num_neurons, device=flat.device)}
        for q in originals:
            self.state.pop(q, None)
        self.state[flat].update(state)
        self._plans.clear()
        self._segment_maps[id(flat)] = segment_map
        self._all_triton = None  # it steps eagerly now

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every parameter's state now (as a fresh step 0 would), e.g. as a template to load into."""
        for group in self.param_groups:
            for p in group["params"]:
                if "step" not in self.state[p]:
                    self._init_moments(p, INNER_RULES[group["rule"]])

    def _init_moments(self, p: Tensor, rule: Rule) -> None:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)  # on the host, as in torch.optim: reading it never syncs a device
        for name in rule.buffers:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ step

    def _step_group(self, group: dict[str, Any], flags: _DeviceFlags | None) -> None:
        rule = INNER_RULES[group["rule"]]
        live = [p for p in group["params"] if p.grad is not None]
        if not live:
            return
        # What a step of these tensors needs is the same every step: after the first, the checks,
        # flags and fused launches come from the cache (the host time of a fused GPU step).
        live_ids = tuple(map(id, live))
        key = (id(group), group["rotational"], group["weight_decay"] > 0, group["per_neuron"], group["neuron_axis"],
               live_ids, tuple(sorted(self._track)), flags is not None)
        if self._live.get(id(group)) != live_ids:
            self._live[id(group)] = live_ids
            self._live_changes += 1
        plan = self._plans.get(key)
        # A fused launch steps its tensors with one step count. Steps of other live sets (a tensor
        # without a gradient on some steps) advance only some counters: a plan whose launches held
        # equal counts must not step them with one count once they differ (the lagging tensor's bias
        # correction); planned again, its launches split by count.
        if plan is None or not plan.steps.holds([self.state[p] for p in live]) or (
                plan.launches and plan.live_changes != self._live_changes and not self._counts_match(plan)):
            plan = self._plans[key] = self._plan(group, rule, live, flags)
        plan.live_changes = self._live_changes
        plan.steps.advance()
        self._advanced.append(plan.steps)
        self._stepped[0] += len(live) - len(plan.rest)
        self._stepped[1] += len(live)
        if plan.launches:
            self._fused_step(group, plan.launches, flags)
        if plan.rest and flags is not None and not flags.apply_on_host([p.grad for p, _ in plan.rest]):
            return  # skipped
        eager = [p for p, rot in plan.rest if not rot]
        flat = [p for p, rot in plan.rest if rot and id(p) in self._segment_maps]
        dense = [p for p, rot in plan.rest if rot and id(p) not in self._segment_maps]
        for batch in self._batches(group, rule, eager, False):
            self._plain_step(batch, group, rule)
        for batch in self._batches(group, rule, dense, True):
            self._rotational_step(batch, group, rule)
        for p in flat:
            self._flat_rotational_step(p, group, rule)

    def _plan(self, group: dict[str, Any], rule: Rule, live: list[Tensor], flags: _DeviceFlags | None) -> _Plan:
        """Check and initialise the state of `live`, and split it between fused launches and the eager path."""
        rotational = [_is_rotational(group, p) for p in live]
        for p, rot in zip(live, rotational, strict=True):
            if "step" not in self.state[p]:
                self._init_moments(p, rule)
            if rot and id(p) not in self._segment_maps and group["per_neuron"] and p.dim() < 2:
                # e.g. a ZeRO flat partition nobody mapped: its neurons are unknown, and treating each
                # element as one would silently turn the RV into another rule
                raise RuntimeError(f"a rotational parameter of shape {tuple(p.shape)} has no neuron axis and no "
                                   "segment map; flat (ZeRO) partitions need adopt_flat_partition()")
            if rot and "neuron_norm" not in self.state[p]:  # e.g. the group was switched to rotational
                if id(p) in self._segment_maps:
                    raise RuntimeError("a flat partition has no per-neuron norms; adopt it before switching "
                                       "its group to rotational")
                self._init_rotational(p, group)
        steps = _StepCounts([self.state[p] for p in live])
        if not self._kernels:
            return _Plan(steps, [], list(zip(live, rotational, strict=True)))
        launches, rest = self._fused_plan(group, rule, live, rotational, flags)
        return _Plan(steps, launches, rest)

    def _fused_step(self, group: dict[str, Any], launches: list[_FusedLaunch], flags: _DeviceFlags | None) -> None:
        """Run the fused launches of a group, each with its tensors' step count (one count per launch)."""
        hypers: dict[int, Hyper] = {}
        for entry in launches:
            step = int(self.state[entry.params[0]]["step"])
            if step not in hypers:
                hypers[step] = _hyper(group, step)
            self._run(entry, hypers[step], flags=flags)

    def _counts_match(self, plan: _Plan) -> bool:
        """Whether the tensors of each of the plan's launches still hold one step count."""
        return all(len({float(self.state[p]["step"]) for p in entry.params}) <= 1 for entry in plan.launches)

    def _run(self, entry: _FusedLaunch, hyper: Hyper, warmup: bool = False, flags: _DeviceFlags | None = None) -> None:
        params = entry.params
        if entry.sharded:
            weights, grads = [_local(p) for p in params], [_local(p.grad) for p in params]
        else:
            weights, grads = params, [p.grad for p in params]
        sums = [self._track[id(p)][1] for p in params] if entry.tracked else None
        on_device = flags is not None and flags.on_device(entry.launch)
        if flags is not None and not on_device and not warmup and not flags.apply_on_host(grads):
            return  # skipped
        entry.launch.run(weights, grads, hyper, sums, warmup=warmup, **({"flags": flags.tensor} if on_device else {}))

    def _compiles(self, entry: _FusedLaunch, hyper: Hyper, flags: _DeviceFlags | None) -> bool:
        """Compile a new launch's kernel before any of it runs; a compiler that fails leaves its tensors to
        the eager step, with a notice (an error with fused=True, or where rotation sums were asked of it)."""
        try:
            self._run(entry, hyper, warmup=True, flags=flags)
            return True
        except KernelRejected as exc:
            reason = str(exc)
            shape = tuple(_local(entry.params[0]).shape)
            if self._fused_required or entry.tracked:
                raise FusedStepUnavailable(
                    f"the fused optimizer step did not compile for {len(entry.params)} tensors of shape {shape} on "
                    f"this device ({reason}); set optim.fused=false") from exc
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"notice: the fused optimizer step did not compile for {len(entry.params)} tensors of shape "
                      f"{shape} ({reason}); they take the eager step, as with optim.fused=false", file=sys.stderr)
            return False

    def _fused_plan(self, group: dict[str, Any], rule: Rule, live: list[Tensor], rotational: list[bool],
                    flags: _DeviceFlags | None) -> tuple:
        """([_FusedLaunch], [(param, rotational)] left to the eager path) for these live tensors.

        A launch holds tensors of one shape, walk, kind and step count (tensors that missed steps,
        having had no gradient, or a partial resume, hold other counts); tracked tensors are walked
        along the tracker's neuron axis.
        """
        members: dict[tuple, list[Tensor]] = {}
        rest = []
        for p, rot in zip(live, rotational, strict=True):
            tracked = self._track.get(id(p))
            ok, axis = self._kernel_walk(group, p, rot, tracked[0] if tracked is not None else None)
            kernel = self._kernels.get(_local(p).device.type)
            if ok and kernel is not None and kernel.supports(_local(p), _local(p.grad), axis):
                walk = axis % p.dim() if axis is not None else None
                key = (kernel, tuple(_local(p).shape), walk, rot, tracked is not None, int(self.state[p]["step"]))
                members.setdefault(key, []).append(p)
            elif tracked is not None:
                raise RuntimeError("rotation sums were requested for a tensor the fused step does not cover")
            else:
                rest.append((p, rot))
        launches = []
        for (kernel, _, walk, rot, tracked, step), params in members.items():
            hyper = _hyper(group, step + 1)  # the step about to be taken
            states = [self.state[p] for p in params]
            launch = kernel.make_launch(walk, rot, [_local(p) for p in params],
                                        [[_local(st[name]) for st in states] for name in rule.buffers],
                                        [_local(st["neuron_norm"]) for st in states] if rot else None,
                                        [_local(st["update_norm_avg"]) for st in states] if rot else None)
            entry = _FusedLaunch(launch, params, tracked, any(isinstance(p, DTensor) for p in params))
            if self._compiles(entry, hyper, flags):
                launches.append(entry)
            else:
                rest += [(p, rot) for p in params]
        return launches, rest

    def _batches(self, group: dict[str, Any], rule: Rule, params: list[Tensor], rotational: bool) -> Iterator[_Batch]:
        """Foreach-able batches of one device, dtype and step count, tiled into row blocks on CPU.

        A batch holds views: of each parameter, its gradient and its state; rotational ones are
        neuron-major (dim 0 indexes neurons) and tiles hold whole neurons only.
        """
        keyed: dict[tuple[torch.device, torch.dtype, int, Any], list[Tensor]] = {}
        for p in params:
            partial = _partial_group(p, _axis(group)) if rotational else None
            keyed.setdefault((p.device, p.dtype, int(self.state[p]["step"]), partial), []).append(p)
        names = ("param", "grad", *rule.buffers)
        for (device, _, step, partial), members in keyed.items():
            # Partial neurons are summed over ranks once per batch: one batch, the same on every rank.
            limit = _CPU_CHUNK_NUMEL if device.type == "cpu" and partial is None else None
            batch = _Batch(step, partial)
            for p in members:
                state = self.state[p]
                views = [_local(t) for t in (p, p.grad, *(state[name] for name in rule.buffers))]
                if rotational:
                    views = [_neuron_major(t, _axis(group)) for t in views]
                    views += [_local(state["neuron_norm"]), _local(state["update_norm_avg"])]
                elif p.dim() == 0:
                    views = [t.view(1) for t in views]
                for tile in _tiles(views, limit):
                    if limit is not None and batch.numel and batch.numel + tile[0].numel() > limit:
                        yield batch
                        batch = _Batch(step, partial)
                    batch.add(names + (_PER_NEURON if rotational else ()), tile)
            if batch.numel:
                yield batch

    def _plain_step(self, batch: _Batch, group: dict[str, Any], rule: Rule) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        params, grads = batch["param"], batch["grad"]
        if rule.coupled_decay and wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        direction = rule.direction(grads, batch.buffers(rule), batch.step, group)
        if not rule.coupled_decay and wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        direction.add_to(params, -lr)

    def _rotational_step(self, batch: _Batch, group: dict[str, Any], rule: Rule) -> None:
        direction = rule.direction(batch["grad"], batch.buffers(rule), batch.step, group)
        weights, updates = batch["param"], direction.unscaled()
        avgs = batch["update_norm_avg"]
        eta = equilibrium_rate(group["rule"], float(group["lr"]), group["weight_decay"], group["betas"],
                               group["momentum"])
        sums = _neuron_sums(weights, updates, group["zero_mean"])
        if batch.partial is not None:
            dist.all_reduce(sums, group=batch.partial)
        coeffs = _rotation_coefficients(
            sums,
            norm=torch.cat(batch["neuron_norm"]), avg=torch.cat(avgs), scale=direction.scale, eta=eta,
            decay=group["update_norm_decay"], step=batch.step, eps=group["rotational_eps"],
            zero_mean=group["zero_mean"])
        torch._foreach_copy_(avgs, coeffs.avg.split([w.shape[0] for w in weights]))
        torch._foreach_mul_(weights, _per_neuron(coeffs.a, weights))
        torch._foreach_addcmul_(weights, updates, _per_neuron(coeffs.b, weights))
        if coeffs.c is not None:
            torch._foreach_add_(weights, _per_neuron(coeffs.c, weights))

    def _flat_rotational_step(self, p: Tensor, group: dict[str, Any], rule: Rule) -> None:
        """The RV step of a ZeRO flat partition: the same coefficients, from all-reduced segment sums."""
        state, segment_map = self.state[p], self._segment_maps[id(p)]
        direction = rule.direction([p.grad], {name: [state[name]] for name in rule.buffers}, int(state["step"]), group)
        w, u = p, direction.unscaled()[0]
        sums = segment_map.rotation_sums(w, u, group["zero_mean"])
        dist.all_reduce(sums, group=segment_map.group)
        eta = equilibrium_rate(group["rule"], float(group["lr"]), group["weight_decay"], group["betas"],
                               group["momentum"])
        coeffs = _rotation_coefficients(
            sums, norm=state["neuron_norm"], avg=state["update_norm_avg"], scale=direction.scale, eta=eta,
            decay=group["update_norm_decay"], step=int(state["step"]), eps=group["rotational_eps"],
            zero_mean=group["zero_mean"])
        state["update_norm_avg"].copy_(coeffs.avg)
        segment_map.apply(w, u, coeffs.a, coeffs.b, coeffs.c)


_PER_NEURON = ("neuron_norm", "update_norm_avg")


class _FusedLaunch(NamedTuple):
    """One kernel launch of a group's step and the parameters it steps."""

    launch: Any  # a Launch of pretrain/optim/fused.py (Triton) or cpu_fused.py (C++)
    params: list[Tensor]
    tracked: bool  # it also writes the rotation tracker's sums
    sharded: bool  # DTensor parameters: their local shards are looked up every step


class _DeviceFlags:
    """A step's `found_inf` and `grad_scale` (set on the optimizer, as a loss scaler does), as the Triton
    kernel takes them: one float32 [2] device tensor [skip, gradient divisor]. Tensors that step
    elsewhere (eager, the C++ kernel) read it on the host once per step, then skip or divide."""

    def __init__(self, found_inf: Tensor | None, grad_scale: Tensor | None, device: torch.device) -> None:
        skip = found_inf if found_inf is not None else torch.zeros((), device=device)
        divisor = grad_scale if grad_scale is not None else torch.ones((), device=device)
        self.tensor = torch.stack([skip.reshape(()).float(), divisor.reshape(()).float()]).to(device)
        self._host: tuple[bool, Tensor] | None = None

    @classmethod
    def of(cls, optimizer: RotationalOptimizer) -> _DeviceFlags | None:
        found_inf, grad_scale = getattr(optimizer, "found_inf", None), getattr(optimizer, "grad_scale", None)
        if found_inf is None and grad_scale is None:
            return None
        return cls(found_inf, grad_scale, next(_local(p).device for g in optimizer.param_groups for p in g["params"]))

    def on_device(self, launch: Any) -> bool:
        """Whether `launch` takes the flags in its kernel (Triton, on the flags' device)."""
        from pretrain.optim import fused

        return isinstance(launch, fused.Launch) and launch.device == self.tensor.device

    def apply_on_host(self, grads: list[Tensor]) -> bool:
        """Read the flags (a host sync, once a step); False: skip. Otherwise divide `grads` in place."""
        if self._host is None:
            self._host = (float(self.tensor[0]) != 0.0, self.tensor[1])
        if self._host[0]:
            return False
        for g in grads:
            g.div_(self._host[1].to(g.device))
        return True


@dataclass
class _Plan:
    """How a group's live tensors step: their step counters, the fused launches, the rest (param, rotational)."""

    steps: _StepCounts
    launches: list[_FusedLaunch]
    rest: list[tuple[Tensor, bool]]
    live_changes: int = 0  # the optimizer's `_live_changes` when its counters were last known equal


class _StepCounts:
    """A group's per-parameter step counters as views into one tensor, so a step advances them with one add.

    The counters stay ordinary `state[p]["step"]` entries (0-d float32 host tensors, as in
    torch.optim) that checkpoints save and load. An entry replaced from outside (DeepSpeed
    restoring its partitions' state, say) no longer `holds`, and the group is planned again.
    """

    def __init__(self, states: list[dict[str, Any]]) -> None:
        steps = [st["step"] for st in states]
        # Packed already, by another plan of these tensors (a measured step's, say): share it.
        self.storage = _packed_base(steps)
        if self.storage is None and all(s.dtype == torch.float32 and s.device.type == "cpu" and s.dim() == 0
                                        and s._base is None for s in steps):
            self.storage = torch.tensor([float(s) for s in steps], dtype=torch.float32)
            for i, st in enumerate(states):
                st["step"] = self.storage[i]
        # Otherwise they are advanced where they are: counters of another kind (e.g. loaded onto a
        # device), or some packed by a plan of another live set (a tensor without a gradient on some
        # steps), which repacking would take from that plan, and each would re-plan every step.
        self.views = [st["step"] for st in states]

    def holds(self, states: list[dict[str, Any]]) -> bool:
        """Whether these are still the counters of `states` (the live tensors' state, in plan order)."""
        return all(st.get("step") is view for st, view in zip(states, self.views, strict=True))

    def advance(self) -> None:
        if self.storage is None:
            torch._foreach_add_(self.views, 1.0)
        else:
            self.storage.add_(1.0)

    def retreat(self) -> None:
        if self.storage is None:
            torch._foreach_sub_(self.views, 1.0)
        else:
            self.storage.sub_(1.0)


def _packed_base(steps: list[Tensor]) -> Tensor | None:
    """The 1-d tensor whose elements `steps` are, in order, if they are views of one."""
    base = steps[0]._base if steps else None
    if base is None or base.shape != (len(steps),):
        return None
    return base if all(s._base is base and s.storage_offset() == i for i, s in enumerate(steps)) else None


class _Batch:
    """Lists of views by role ("param", "grad", buffer names, per-neuron state), with one step count."""

    def __init__(self, step: int, partial: Any = None) -> None:
        self.step = step
        self.partial = partial  # the process group to sum per-neuron sums over, if neurons are split
        self.numel = 0
        self.slots: dict[str, list[Tensor]] = {}

    def add(self, names: tuple[str, ...], views: list[Tensor]) -> None:
        for name, view in zip(names, views, strict=True):
            self.slots.setdefault(name, []).append(view)
        self.numel += views[0].numel()

    def __getitem__(self, name: str) -> list[Tensor]:
        return self.slots[name]

    def buffers(self, rule: Rule) -> dict[str, list[Tensor]]:
        return {name: self.slots[name] for name in rule.buffers}


@dataclass
class _Coefficients:
    a: Tensor  # w_new = a*w + b*u + c per neuron, u the direction's unscaled tensors
    b: Tensor
    c: Tensor | None  # None without zero_mean
    avg: Tensor  # the new update-norm average s


def _rotation_coefficients(sums: Tensor, *, norm: Tensor, avg: Tensor, scale: float, eta: float, decay: float,
                           step: int, eps: float, zero_mean: bool) -> _Coefficients:
    """Steps 3-6 of the RV update as per-neuron coefficients, from the sums of `_neuron_sums`.

    With u = scale * u_raw, u1 = u - A*w, u2 = u1 - M, w1 = w - B*u2, w2 = w1 - nu (the means
    M, nu only with zero_mean) and w_new = r*w2: a = r*(1 + B*A), b = -r*B*scale, c = r*(B*M - nu).
    Below, alpha = A/scale, mu = M/scale and beta = B*scale are per unit of u_raw, so `scale`
    enters only the update-norm average. Fused ops keep this to ~30 small kernels: it runs once
    per CPU tile, where its dispatch cost shows.
    """
    w_sq, u_sq, dot = sums[0], sums[1], sums[2]
    alpha = dot / w_sq.clamp_min(_TINY)  # a zero neuron has no radial part (and stays zero)
    u2_sq = torch.addcmul(u_sq, alpha, dot, value=-1.0)  # ||u1||^2 = ||u||^2 - alpha*<u, w>
    if zero_mean:
        w_sum, u_sum, count = sums[3], sums[4], sums[5]
        u1_sum = torch.addcmul(u_sum, alpha, w_sum, value=-1.0)
        mu = u1_sum / count
        nu = w_sum / count  # the mean of w1, as u2 has none
        u2_sq.addcmul_(mu, u1_sum, value=-1.0)  # ||u2||^2 = ||u1||^2 - count*mu^2
    u2_sq.clamp_min_(0.0)  # cancellation must not leave it negative
    avg = torch.add(avg * decay, u2_sq, alpha=(1.0 - decay) * scale ** 2)
    beta = (eta * scale) * norm / torch.sqrt(avg / (1.0 - decay ** step)).add_(eps)
    w1_sq = torch.addcmul(w_sq, beta.square(), u2_sq)  # ||w - beta*u2||^2 when <w, u2> = 0
    if zero_mean:  # <w, u2> = -mu*sum(w); removing the mean takes count*nu^2 = nu*sum(w)
        w1_sq.addcmul_(w_sum, torch.addcmul(nu, beta, mu, value=-2.0), value=-1.0)
    r = w1_sq.clamp_min_(_TINY).rsqrt_().mul_(norm)
    r_beta = r * beta
    return _Coefficients(a=torch.addcmul(r, r_beta, alpha), b=-r_beta,
                         c=r * (beta * mu - nu) if zero_mean else None, avg=avg)


def _neuron_sums(weights: list[Tensor], updates: list[Tensor], zero_mean: bool) -> Tensor:
    """Per-neuron sums of neuron-major tensors as one [rows, neurons] float32 tensor.

    Rows: ||w||^2, ||u||^2, <u, w>, and with zero_mean also sum(w), sum(u), elements per neuron.
    Rows of different tensors differ in length, which no foreach op reduces over, hence the
    loop; writing into one buffer lets the arithmetic that follows run once per batch.
    """
    sums = weights[0].new_empty((6 if zero_mean else 3, sum(w.shape[0] for w in weights)), dtype=torch.float32)
    start = 0
    for w, u in zip(weights, updates, strict=True):
        seg = sums[:, start:start + w.shape[0]]
        start += w.shape[0]
        w, u = w.flatten(1), u.flatten(1)  # views, except for a >2-d tensor whose neuron axis is not 0
        torch.linalg.vector_norm(w, dim=1, dtype=torch.float32, out=seg[0])
        torch.linalg.vector_norm(u, dim=1, dtype=torch.float32, out=seg[1])
        torch.linalg.vecdot(u.float(), w.float(), dim=1, out=seg[2])  # faster than (u * w).sum() on CPU
        if zero_mean:
            torch.sum(w, dim=1, dtype=torch.float32, out=seg[3])
            torch.sum(u, dim=1, dtype=torch.float32, out=seg[4])
            seg[5].fill_(w.shape[1])
    sums[:2].square_()
    return sums


class FusedStepUnavailable(UserError):
    """A fused kernel is required (fused=True, or rotation sums asked of it) but cannot run here: no
    Triton, a C++ step that does not build, or a kernel the device's compiler rejects."""


def _hyper(group: dict[str, Any], step: int) -> Hyper:
    """The fused kernels' scalars for `step` of `group` (eta is read by rotational launches only)."""
    eta = equilibrium_rate(group["rule"], float(group["lr"]), group["weight_decay"], group["betas"], group["momentum"])
    return Hyper.for_step(group, step, eta)


def _kernels(required: bool, device_types: set[str]) -> dict[str, Any]:
    """The fused kernel module per device type; `required`: every device type must have one (else raise)."""
    kernels: dict[str, Any] = {}
    try:
        from pretrain.optim import fused
    except ImportError as exc:
        if required and "cuda" in device_types:
            raise FusedStepUnavailable(f"the fused step on CUDA needs Triton, which does not import: {exc}") from exc
        fused = None
    if fused is not None:
        kernels["cuda"] = fused
    if required and "cpu" in device_types:
        if fused is not None and fused.interpreting():
            kernels["cpu"] = fused
        else:
            from pretrain.optim import cpu_fused

            try:
                cpu_fused.load()
            except cpu_fused.BuildError as exc:
                raise FusedStepUnavailable(f"the fused CPU step needs a C++ compiler with OpenMP (g++, or $CXX), "
                                           f"and its build failed: {exc}") from exc
            kernels["cpu"] = cpu_fused
    unknown = device_types - set(kernels) - {"cuda", "cpu"}
    if required and unknown:
        raise FusedStepUnavailable(f"no fused step for {', '.join(sorted(unknown))} tensors")
    return kernels


def _per_neuron(values: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Split a flat per-neuron vector into views that broadcast against each neuron-major tensor."""
    parts = values.split([t.shape[0] for t in like])
    return [v.view(-1, *([1] * (t.dim() - 1))) for v, t in zip(parts, like, strict=True)]


def _neuron_major(t: Tensor, axis: int | None) -> Tensor:
    """View of `t` with one neuron per index of dim 0 (axis None: the whole tensor is one neuron)."""
    return t.unsqueeze(0) if axis is None else t.movedim(axis, 0)


def _axis(group: dict[str, Any]) -> int | None:
    return group["neuron_axis"] if group["per_neuron"] else None


def _is_rotational(group: dict[str, Any], p: Tensor) -> bool:
    if group["rotational"] is None:  # the paper's default: decayed matrices rotate
        return group["weight_decay"] > 0 and p.dim() >= 2
    if group["rotational"] and group["weight_decay"] <= 0:
        raise ValueError("a rotational parameter group needs weight_decay > 0 (it sets the equilibrium rotation)")
    return bool(group["rotational"])


def _check_neuron_axis(group: dict[str, Any], p: Tensor) -> None:
    if not group["per_neuron"]:
        return
    if p.dim() < 2:
        raise ValueError(f"per-neuron rotation needs a tensor with a neuron axis, got shape {tuple(p.shape)}; "
                         "set rotational=False or per_neuron=False for it")
    if not -p.dim() <= group["neuron_axis"] < p.dim():
        raise ValueError(f"neuron_axis {group['neuron_axis']} is out of range for a tensor of shape {tuple(p.shape)}")


def _tiles(views: list[Tensor], limit: int | None) -> Iterator[list[Tensor]]:
    """Row blocks of `views` (tensors with equal dim 0) of at most about `limit` elements each."""
    per_row = views[0].numel() // max(1, len(views[0]))
    rows = len(views[0]) if limit is None else max(1, limit // max(1, per_row))
    if rows >= len(views[0]):
        yield views
        return
    yield from (list(tile) for tile in zip(*(v.split(rows) for v in views), strict=True))


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (an alias: in-place updates reach the DTensor); any other tensor as is."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _partial_group(p: Tensor, axis: int | None) -> Any:
    """The process group holding the rest of `p`'s neurons, or None when local neurons are whole."""
    if not isinstance(p, DTensor):
        return None
    if p.device_mesh.ndim != 1:
        raise ValueError(f"rotational tensors on a {p.device_mesh.ndim}-d device mesh are not supported; "
                         "use a 1-d (data-parallel) mesh")
    if isinstance(p.placements[0], Replicate) or (axis is not None and sharded_along_neurons(p, axis)):
        return None
    return p.device_mesh.get_group()


def _reduced(t: Tensor, group: Any) -> Tensor:
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def _per_neuron_state(p: Tensor, axis: int | None, local: Tensor) -> Tensor:
    """A [neurons] state vector placed like `p`'s neurons: sharded with them, or replicated when split."""
    if not isinstance(p, DTensor):
        return local
    if _partial_group(p, axis) is None and isinstance(p.placements[0], Shard):
        size = p.shape[axis] if axis is not None else 1
        return DTensor.from_local(local, p.device_mesh, [Shard(0)], run_check=False, shape=torch.Size([size]),
                                  stride=(1,))
    return DTensor.from_local(local, p.device_mesh, [Replicate()], run_check=False)
