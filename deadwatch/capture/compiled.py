"""The compiled path: what the hooks do while torch.compile traces them.

Under torch.compile (fullgraph=True included) the hooks in hooks.py and the function wrappers in
functions.py are traced into the graph like any other op, so a watched model compiles with no graph
break from deadwatch and a CUDA graph can span it. Traced code may mutate tensors and set Python
attributes to constants; what it cannot do is read Python state that changes from step to step (a
compiled graph would be guarded on it and recompiled every step) or inspect frames. So, side by side
with the eager path:

* sites are found in eager steps: the first step after watch() runs eagerly (a process-wide
  torch.compiler stance, "force_eager", held for that one step), which finds every site, its unit axis
  and its producer in the autograd graph exactly as without compile. A site first met inside a
  compiled graph is noted (Capture.unseen) and found by another eager step; one that no eager step
  finds after a few tries is left unwatched, with a warning;
* record() folds an output into the step buffers with tensor ops only: max, and add, where the eager
  path writes the first call of a step straight into the buffers (that needs Python's count of the
  step's calls). The values counted go into a per-site tensor (Counters.step_obs) instead of a Python
  int; the report path moves them to the host (Registry.settle). Each site's buffers are reached
  through its Counters' flat tensors, so the graph's inputs do not alias each other. It runs when the
  module running the activation returns (Capture.deferred), so that inductor reads the stored output
  rather than computing the activation again inside each reduction;
* an activation function's owner is the innermost module whose forward is running (Capture.stack),
  not the nearest module frame on the stack, which traced code cannot see. They differ only for a
  model that deadwatch does not watch, called inside a watched one: compiled, its functions count
  for the watched module calling it. A call waits for the next hook (Capture.waiting): F.relu inside
  nn.ReLU.forward is followed by the module's own hook returning the same tensor, which drops it, so
  the eager path's rule (the module's site counts it, once) holds without a hook before each module.

The verdict, the counters and the reports are the same as in eager mode.
"""

from __future__ import annotations

import torch

from .. import stats

ATTEMPTS = 3  # eager steps that may look for a site met only in compiled graphs


def record(site: stats.Site, out: torch.Tensor, mask: torch.Tensor | None) -> None:
    """stats.record() for traced code: the same figures, folded with max and add into the step buffers.

    Capture calls it when the module that ran the activation returns, not at the activation itself:
    by then the layer reading the output has been traced too, which makes inductor store the output
    in a buffer that these reductions read. Traced at the activation, they came before any reader, and
    inductor fused them with the activation, computing it again inside each reduction (GELU's erf
    three times over), which cost more than the counting did.
    """
    if out.ndim != site.ndim or out.shape[site.axis] != site.units:
        return  # the eager path warns; the eager step that found the site ran this shape
    c = site.counters
    sl = site.slice
    v = stats.values(site, out, mask)
    step_max = c.step_max[sl]
    step_max.copy_(torch.maximum(step_max, _per_unit(torch.amax, v.full, site).to(step_max.dtype)))
    acc = torch.float64 if stats.wide(v) else torch.float32
    sums = c.pairs["step_fired"]  # rows: step_fired, step_abs
    sums[:, sl].add_(torch.stack([_per_unit(torch.sum, v.fired, site, acc), _per_unit(torch.sum, v.magnitude, site, acc)]))
    if v.near is not None:
        c.step_near[sl].add_(_per_unit(torch.sum, v.near, site, acc))
    c.step_obs[site.index].add_(v.counted)
    site.ran = True
    c.traced = True


def _per_unit(op, x: torch.Tensor, site: stats.Site, dtype: torch.dtype | None = None) -> torch.Tensor:
    """op (torch.amax or torch.sum) over every dim but the unit axis. Where the units are the last dim of an
    output with several dims before them (tokens), inductor's CPU code for one reduction over all those rows
    reads memory a unit at a time: the max of a (16, 128, 1024) GELU output took 4.9-5.7 ms that way, 1.9 ms
    as two reductions, over the dims after the batch dim and then over the batch. No size enters the choice,
    so a graph with dynamic shapes is not guarded on its sizes. On a GPU inductor splits large reductions
    itself: one reduction there."""
    kw = {} if dtype is None else {"dtype": dtype}
    if x.device.type != "cpu" or site.axis != x.ndim - 1 or x.ndim < 3:
        return op(x, site.dims, **kw)
    return op(op(x, site.dims[1:], **kw), 0)


def internal() -> bool:
    """Real Python run by a compiler on fake tensors (dynamo's shape propagation, AOT or export tracing):
    not a forward, nothing to count. Traced code itself sees torch.compiler.is_dynamo_compiling()."""
    return torch.compiler.is_compiling() and not torch.compiler.is_dynamo_compiling()


class EagerSteps:
    """The steps that must run eagerly (a site to find), for every monitor of the process: the
    torch.compiler stance is "force_eager" while some monitor asks for it. When the last one lets go,
    the stance goes back to exactly what it was just before deadwatch set it, unless the user set
    another stance meanwhile: theirs is kept."""

    def __init__(self) -> None:
        self.holders: set[int] = set()
        self.held: object | None = None  # torch.compiler.set_stance's object: restores the prior stance
        self.ours: object | None = None  # the stance object deadwatch set, to tell whether it is still in force

    def want(self, owner: object, eager: bool) -> None:
        self.set(id(owner), eager)

    def set(self, owner: int, eager: bool) -> None:
        if eager:
            self.holders.add(owner)
        else:
            self.holders.discard(owner)
        if self.holders and self.held is None:
            self.held = torch.compiler.set_stance("force_eager")
            self.ours = _stance()
        elif not self.holders and self.held is not None:
            held, self.held = self.held, None
            if self.ours is not None and _stance() is not self.ours:
                return  # the user set a stance while deadwatch held its own: leave theirs
            held.__exit__(None, None, None)  # type: ignore[attr-defined]


def _stance() -> object | None:
    """The stance in force now (torch._dynamo's own object; None where this torch does not keep one)."""
    from torch._dynamo import eval_frame
    return getattr(eval_frame, "_stance", None)


EAGER = EagerSteps()
