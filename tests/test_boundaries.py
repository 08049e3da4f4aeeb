"""Boundary hooks after the first steps (Capture._prune): only the modules a numbering of calls needs keep
their pre/forward hooks, and every loop still maps its calls to the same sites with the same counts as with
every module hooked. Each test runs a twin with pruning off and compares."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deadwatch
from deadwatch.capture import hooks


class Block(nn.Module):
    """One ReLU module called twice and F.gelu called twice per forward: calls numbered past 0."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.relu = nn.Linear(d, d), nn.Linear(d, d), nn.ReLU()

    def forward(self, x):
        h = self.relu(self.fc1(x))
        h = self.relu(self.fc2(h))
        return F.gelu(F.gelu(h) - 0.5)


class Stem(nn.Module):
    """A ReLU module called once per forward, or twice when `twice` is set (a forward that changes)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(d, d), nn.ReLU()
        self.twice = False

    def forward(self, x):
        h = self.act(self.fc(x))
        return self.act(h - 0.1) if self.twice else h


class Tail(nn.Module):
    """Calls F.relu once per forward: an owner, numbered 0 only."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return F.relu(self.fc(x))


class Net(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(Stem(d), nn.Sequential(nn.Linear(d, d), nn.Tanh()))
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.tail = Tail(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.tail(self.blocks(self.stem(x))))


def planted():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.stem[0].fc.bias[[1, 4]] = -1e4
        net.blocks[0].fc1.bias[2] = -1e4
    return net


KEPT = 5  # boundaries kept on Net after pruning


def boundaries(monitor) -> int:
    return len(monitor._capture.boundaries)


def run(net, loop, steps, prune=True):
    """Run `loop(net, step, x)` for each step; the report and the boundary count after each step."""
    g = torch.Generator().manual_seed(1)
    hooked = []
    with deadwatch.watch(net, reporters=[], window=100, report_every=1000, count_subsample=1) as monitor:
        monitor._capture.keep_all = not prune  # the twin: every boundary stays hooked
        for step in range(steps):
            loop(net, step, torch.randn(5, 8, generator=g))
            monitor.step()
            hooked.append(boundaries(monitor))
        report = monitor.report()
    return report, hooked


def same(a, b):
    assert [layer.name for layer in a.layers] == [layer.name for layer in b.layers]
    for x, y in zip(a.layers, b.layers):
        assert x.observations == y.observations, x.name
        assert x.dead_units == y.dead_units, x.name
        assert torch.equal(torch.as_tensor(x.firing_rate), torch.as_tensor(y.firing_rate)), x.name


def compare(loop, steps, make=None):
    net = (make or planted)()
    twin = copy.deepcopy(net)
    pruned, hooked = run(net, loop, steps)
    full, full_hooked = run(twin, loop, steps, prune=False)
    same(pruned, full)
    return pruned, hooked, full_hooked


def whole(net, step, x):
    net(x)


def test_after_two_steps_only_the_needed_modules_keep_hooks():
    report, hooked, full = compare(whole, 5)
    assert report.layer("stem.0.act").dead_units == [1, 4]
    assert 2 in report.layer("blocks.0.relu#0").dead_units
    # the root, blocks and each block (its ReLU is called twice, it calls F.gelu twice), tail (it calls
    # F.relu: a traced graph finds it on the stack); not stem, stem.0, stem.1: nothing under them is
    # numbered past 0
    assert hooked[0] == full[0] == 8 and hooked[1:] == [KEPT] * 4 and full == [8] * 5


def test_a_loop_entering_a_block_directly_keeps_its_numbering():
    """blocks.0's ReLU runs twice per forward: entering blocks.0 must still give #0 and #1."""
    def loop(net, step, x):
        if step < 2:
            net(x)
        else:
            for _ in range(2):                      # micro-batches through one block
                net.blocks[0](x)
    report, hooked, _ = compare(loop, 5)
    assert report.layer("blocks.0.relu#1").observations == 5 + 5 + 3 * 2 * 5
    assert hooked[-1] == KEPT                       # blocks.0 was kept: no surprise


def test_modules_the_loop_enters_keep_their_hooks():
    """A loop that runs the stem, then the blocks (as a VAE loop runs encoder and decoder): both are
    entries, kept; nothing is a surprise."""
    def loop(net, step, x):
        net.tail(net.blocks(net.stem(x)))
    report, hooked, full = compare(loop, 5)
    assert hooked[1:] == [KEPT + 1] * 4 and full[-1] == 8   # + stem (blocks is kept anyway)
    assert report.layer("tail.relu#0").observations == 5 * 5


def test_a_model_compiled_after_pruning_counts_its_function_sites():
    """Traced code finds a function's owner on the stack of hooked modules: owners keep their hooks. Once a
    graph has traced the pruned hooks, every module is hooked again (the next graph records each output
    when its own module returns, as a model compiled from the start does)."""
    net = planted()
    g = torch.Generator().manual_seed(2)
    with deadwatch.watch(net, reporters=[], count_subsample=1, report_every=1000) as monitor:
        for _ in range(3):
            net(torch.randn(5, 8, generator=g))
            monitor.step()
        assert monitor._capture.pruned
        compiled = torch.compile(net, backend="eager", fullgraph=True)
        for _ in range(3):
            compiled(torch.randn(5, 8, generator=g))
            monitor.step()
        report = monitor.report()
        assert not monitor._capture.pruned and boundaries(monitor) == 8   # every hook back for the graphs
    assert report.layer("tail.relu#0").observations == 6 * 5
    assert report.layer("blocks.1.gelu#1").observations == 6 * 5


def test_an_unforeseen_entry_counts_and_hooks_everything_again():
    """stem lost its hooks; a loop entering it later counts its single-call site as call 0 and, from the
    next step, every module is hooked again."""
    def loop(net, step, x):
        if step < 3:
            net(x)
        else:
            net.stem(x)
            net.stem(x)
    report, hooked, full = compare(loop, 6)
    assert report.layer("stem.0.act").observations == 3 * 5 + 3 * 2 * 5
    assert hooked[1:3] == [KEPT] * 2 and hooked[3:] == [full[-1]] * 3


def test_a_new_owner_after_pruning_hooks_everything_again():
    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.on = False

        def forward(self, x):
            return F.relu(self.fc(x)) if self.on else self.fc(x)

    def loop(net, step, x):
        net.blocks[1].late.on = step >= 3
        net(x)
    net = planted()
    net.blocks[1].late = Late()
    net.blocks[1].forward = lambda x, b=net.blocks[1]: b.late(Block.forward(b, x))
    pruned, hooked = run(net, loop, 6)
    assert hooked[2] < hooked[-1]
    assert pruned.layer("blocks.1.late.relu#0").observations == 3 * 5


def test_an_activation_called_by_the_loop_keeps_every_hook():
    def loop(net, step, x):
        net(x)
        net.stem[1][1](x)                           # the loop calls an activation module itself
    report, hooked, full = compare(loop, 4)
    assert hooked == full


def test_a_forward_that_changes_in_an_unforeseen_entry_is_a_known_limit():
    """Documented limit: a module first called twice per forward inside a module the loop had never
    entered, in the step that shows both, numbers both calls 0 (the twin with every hook: #0 and #1).
    The steps after are hooked whole again."""
    def loop(net, step, x):
        net.stem[0].twice = step >= 3
        if step < 3:
            net(x)
        else:
            net.stem[0](x)
    net = planted()
    pruned, hooked = run(net, loop, 5)
    assert pruned.layer("stem.0.act#0").observations == 3 * 5 + 2 * 5 + 5   # step 4: both calls here
    assert pruned.layer("stem.0.act#1").observations == 5                 # step 5 only


def test_compiled_models_keep_every_hook():
    net = planted()
    with deadwatch.watch(net, reporters=[]) as monitor:
        before = boundaries(monitor)
        compiled = torch.compile(net, backend="eager", fullgraph=True)
        for _ in range(4):
            compiled(torch.randn(5, 8))
            monitor.step()
        assert boundaries(monitor) == before


def test_a_compiled_model_is_never_pruned_at_any_step():
    """Pruned, its graph would be traced on fewer hooks and then hooked whole again: one needless recompile."""
    net = planted()
    with deadwatch.watch(net, reporters=[]) as monitor:
        before = boundaries(monitor)
        compiled = torch.compile(net, backend="eager", fullgraph=True)
        counts = []
        for _ in range(4):
            compiled(torch.randn(5, 8))
            monitor.step()
            counts.append(boundaries(monitor))
    assert counts == [before] * 4


@pytest.mark.parametrize("steps", [1, 2])
def test_nothing_is_pruned_before_prune_after_steps(steps):
    net = planted()
    with deadwatch.watch(net, reporters=[]) as monitor:
        before = boundaries(monitor)
        for _ in range(steps):
            net(torch.randn(5, 8))
            monitor.step()
        assert boundaries(monitor) == (before if steps < hooks.PRUNE_AFTER else KEPT)


def test_close_removes_the_kept_and_the_rehooked_boundaries():
    net = planted()
    monitor = deadwatch.watch(net, reporters=[])
    for step in range(4):
        (net.stem if step == 3 else net)(torch.randn(5, 8))
        monitor.step()
    monitor.close()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


class Twice(nn.Module):
    """Runs its Tail twice: the Tail's F.relu is numbered #0 and #1 per forward, and no activation module
    under it is called twice."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inner = Tail(d)

    def forward(self, x):
        return self.inner(self.inner(x) - 0.2)


class Outer(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.twice = Twice(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.twice(x))


def test_a_loop_entering_the_caller_of_a_twice_called_owner_keeps_its_numbering():
    def loop(net, step, x):
        if step < 2:
            net(x)
        else:
            net.twice(x)
    def make():
        torch.manual_seed(0)
        return Outer()
    report, hooked, _ = compare(loop, 4, make)
    assert report.layer("twice.inner.relu#1").observations == 4 * 5
