"""One map of the layers around each site, read from the autograd graph of a real forward.

For each watched site, a frozen `SiteLayers` says (module paths, as in model.named_modules()):

  producers          the layers whose output rows make the units: the one feeding the activation first,
                     then the partners it is multiplied with before any layer reads it (a gated MLP,
                     down(act(gate(x)) * up(x)): ("gate", "up")). Empty when not found.
  norm               a norm between the first producer and the activation (BatchNorm, also LayerNorm,
                     GroupNorm, RMSNorm: recycling takes only BatchNorm-type ones), else None.
  consumers          EVERY layer that reads the units (all heads, all branches), sorted.
  input_site         the name of the watched site whose output the first producer reads directly
                     (through views, dropout, pooling), else None.
  input_nonnegative  that input is provably >= 0: the output of a ReLU-family activation (or any
                     watched site whose outputs cannot be negative), a sigmoid or a softmax.
  coupled            why the units' channels are coupled to other tensors' (their pre-activation is a
                     sum: a residual add; their output is added to or concatenated with other tensors),
                     else None.
  why                why the layers could not be mapped, else None; then the fields above may be empty
                     or partial (a site that first ran without a graph: its producer, from its
                     nn.Sequential or from a reentrant checkpoint's recomputation in backward).
  repeated           of the layers above, those whose parameters are used more than once per forward
                     (one module called several times, tied weights).

`SiteLayers.shift(model)` is the parameter that shifts each unit's pre-activation: the norm's bias
when a norm sits between, else the first producer's bias, else None; never another layer's.
`Monitor.site_layers()` returns {site name: SiteLayers}, named as in Report.layers.

How it is read. Capture hands the map each watched site's output when it first finds the site
(`found`), and what the outermost forward returned (`forward_done`; None when it saw none). Once per
forward in which sites were found, with the graph of that forward:
- back from each new site's output, through ops that keep units apart (views, dropout, scaling by a
  constant), to the layer that made it (through one norm at most): producer, norm, input site;
- forward from its output, along the graph reversed from what the forward returned, through ops that
  send 0 to 0 unit by unit (views, dropout, scaling, pooling, a product with another layer's output),
  to every layer reading the units. Anything else met on the way (an add, a concatenation, another op,
  the forward's own output) is named in `coupled` or `why`.
A site first seen without a graph is also handed over (`recomputed`) if a reentrant checkpoint
recomputes it in backward, once. No reference to the graph is kept afterwards. The hook path only
keeps a reference (`found`); the walks run once per site, when its forward returns.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Iterator

import torch
from torch import nn

DEPTH = 36         # graph nodes to follow through ops that keep units apart
MAX_NODES = 2_000_000  # a forward's graph read whole; larger: not mapped


@dataclasses.dataclass(frozen=True)
class SiteLayers:
    """The layers around one site (see the module docstring)."""

    producers: tuple[str, ...] = ()
    norm: str | None = None
    consumers: tuple[str, ...] = ()
    input_site: str | None = None
    input_nonnegative: bool = False
    coupled: str | None = None
    why: str | None = None
    repeated: tuple[str, ...] = ()

    def shift(self, model: nn.Module) -> tuple[nn.Parameter, str] | None:
        """(the parameter shifting each unit's pre-activation, its name in `model`), or None."""
        path = self.norm if self.norm is not None else self.producers[0] if self.producers else None
        if path is None:
            return None
        bias = getattr(model.get_submodule(path), "bias", None)
        if not isinstance(bias, nn.Parameter) or bias.ndim != 1:
            return None
        return bias, f"{path}.bias" if path else "bias"


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or \
        type(m).__name__.endswith("RMSNorm")


def is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)


def is_layer(m: nn.Module) -> bool:
    """A layer whose units are rows of its weight and whose inputs are columns: Linear, Conv, HF Conv1D."""
    return isinstance(m, nn.Linear) or is_conv1d(m) or (
        isinstance(m, nn.modules.conv._ConvNd) and not m.transposed)


# Ops between a layer and its activation that keep each unit's values its own: views and copies,
# dropout, and (with a single input that needs grad) scaling or shifting by a constant.
THROUGH = ("ViewBackward", "UnsafeViewBackward", "ReshapeAlias", "CloneBackward", "NativeDropoutBackward",
           "ToCopyBackward", "AliasBackward", "MulBackward", "DivBackward", "AddBackward1", "SubBackward1")
SUMS = ("AddBackward0", "SubBackward0")  # a tensor added: a residual connection, even when it needs no grad
# Ops after an activation that send 0 to 0 unit by unit (Mul/Div: by a constant, or a gate partner).
ZERO_KEEPING = ("ViewBackward", "UnsafeViewBackward", "ReshapeAlias", "CloneBackward", "NativeDropoutBackward",
                "ToCopyBackward", "AliasBackward", "TransposeBackward", "PermuteBackward", "TBackward",
                "SqueezeBackward", "UnsqueezeBackward", "SelectBackward", "SliceBackward", "MaxPool",
                "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "MeanBackward1", "MulBackward", "DivBackward")
# Ops between an input and the layer reading it that keep values' signs.
SIGN_KEEPING = ("ViewBackward", "UnsafeViewBackward", "ReshapeAlias", "CloneBackward", "NativeDropoutBackward",
                "ToCopyBackward", "AliasBackward", "TransposeBackward", "PermuteBackward", "MaxPool", "AvgPool",
                "AdaptiveAvgPool", "AdaptiveMaxPool")
NONNEGATIVE_OPS = ("ReluBackward", "SigmoidBackward", "SoftmaxBackward", "SoftplusBackward", "HardsigmoidBackward")
CONCATS = ("CatBackward", "StackBackward")


def _name(node: Any) -> str:
    return type(node).__name__ if node is not None else ""


def _op(node: Any) -> str:
    """An autograd node's op: AddBackward1 -> Add."""
    return _name(node).rstrip("0123456789").removesuffix("Backward")


def _leaf(child: Any) -> torch.Tensor | None:
    """The parameter behind a node input: an AccumulateGrad, or the transpose addmm takes of a weight."""
    var = getattr(child, "variable", None)
    if var is None and _name(child).startswith(("TBackward", "TransposeBackward", "PermuteBackward")):
        leaf = [c for c, _ in child.next_functions if c is not None]
        var = getattr(leaf[0], "variable", None) if len(leaf) == 1 else None
    return var


def _grad_inputs(node: Any, params: dict[int, tuple[str, ...]]) -> tuple[list[Any], list[torch.Tensor]]:
    """A node's inputs that need grad, split into other nodes and the model's parameters."""
    nodes, found = [], []
    for child, _ in node.next_functions:
        if child is None:
            continue
        var = _leaf(child)
        if var is not None and id(var) in params:
            found.append(var)
        else:
            nodes.append(child)
    return nodes, found


def _module_of(params: dict[int, tuple[str, ...]], found: list[torch.Tensor]) -> str | None:
    """The one module holding all of `found` (a tied weight has several names: the one with the others)."""
    paths = set.intersection(*({name.rpartition(".")[0] for name in params[id(p)]} for p in found))
    return paths.pop() if len(paths) == 1 else None


class _Graph:
    """The graph of one forward, reversed: who reads each node, and how often each parameter is read."""

    def __init__(self, roots: list[Any], params: dict[int, tuple[str, ...]]):
        self.roots = set(roots)
        self.users: dict[Any, list[Any]] = {}
        self.uses: dict[str, int] = {}   # parameter name -> nodes reading it
        frontier, seen = list(self.roots), set(self.roots)
        while frontier:
            node = frontier.pop()
            for child, _ in node.next_functions:
                if child is None:
                    continue
                users = self.users.setdefault(child, [])
                if node not in users:
                    users.append(node)
                if child not in seen:
                    seen.add(child)
                    if len(seen) > MAX_NODES:
                        raise ValueError(f"the forward's autograd graph has more than {MAX_NODES} nodes")
                    frontier.append(child)
        for node, users in self.users.items():
            var = getattr(node, "variable", None)
            if var is not None and id(var) in params:
                for name in params[id(var)]:
                    self.uses[name] = len(users)


class SiteMap:
    """The map of one watched model: filled by capture's calls, read by recycling and the causes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: dict[Hashable, SiteLayers] = {}    # by site key; input_site: see self.inputs
        self.inputs: dict[Hashable, Hashable] = {}      # site key -> the key of the site feeding it
        self.pending: list[tuple[Hashable, Any]] = []   # (key, grad_fn of its output) found in this forward
        self.nonnegative: set[Hashable] = set()          # sites whose outputs are never < 0
        self.found_at: dict[tuple[str, str | None], int] = {}   # sites found per (module path, function)
        self.blind: dict[tuple[str, str | None], Hashable] = {}  # ... -> the one first seen without a graph

    # -- told by capture
    def found(self, key: Hashable, out: torch.Tensor, nonnegative: bool) -> None:
        """A watched site first seen, with its output (the hook path: only keeps a reference)."""
        self.pending.append((key, out.grad_fn))
        if nonnegative:
            self.nonnegative.add(key)
        where = (key.path, key.function)
        self.found_at[where] = self.found_at.get(where, 0) + 1
        if out.grad_fn is None:
            self.blind[where] = key

    def recomputed(self, where: tuple[str, str | None], out: torch.Tensor) -> None:
        """An activation run again in backward (a reentrant checkpoint recomputes its segment, with a graph,
        after a forward without one): the layers feeding the site it is, when one site only runs there, read
        from that graph. Its consumers stay unknown: the recomputed graph ends at the segment's output."""
        key = self.blind.pop(where, None)
        if key is None or not isinstance(out, torch.Tensor) or out.grad_fn is None or self.found_at.get(where) != 1 or key not in self.layers:
            return
        try:
            producer, norm, _, nonneg, coupled, why = self._back(out.grad_fn, self._params(), {})
        except Exception:  # never a failed backward: the site keeps what the forward told
            return
        if why is None:
            self.layers[key] = dataclasses.replace(self.layers[key], producers=(producer,) if producer else (),
                                                   norm=norm, input_nonnegative=nonneg, coupled=coupled)

    def forward_done(self, out: Any) -> None:
        """The outermost forward returned `out` (None: none seen): map the sites found in it."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        params = self._params()
        outputs = {fn: key for key, fn in pending if fn is not None}
        graph: _Graph | None = None
        problem = "no forward of the model returned after it ran (an activation called outside the model's forward?)"
        if out is not None:
            try:
                graph, problem = _Graph([t.grad_fn for t in _tensors(out) if t.grad_fn is not None], params), None
            except Exception as e:   # never a failed forward: the sites are left unmapped, saying why
                problem = f"its autograd graph could not be read ({e})"
        for key, fn in pending:
            try:
                self.layers[key], feeding = self._map(key, fn, graph, problem, params, outputs)
            except Exception as e:
                self.layers[key], feeding = SiteLayers(why=f"its autograd graph could not be read ({e})"), None
            if feeding is not None:
                self.inputs[key] = feeding

    def _params(self) -> dict[int, tuple[str, ...]]:
        """id(parameter) -> its names (several: tied in several layers)."""
        params: dict[int, tuple[str, ...]] = {}
        for path, m in self.model.named_modules():  # a module registered twice: under its first path
            for name, p in m._parameters.items():
                if p is not None:
                    params[id(p)] = (*params.get(id(p), ()), f"{path}.{name}" if path else name)
        return params

    # -- read
    def get(self, key: Hashable, name_of: dict[Hashable, str]) -> SiteLayers:
        """The site's layers, its input site named as in reports (`name_of`: site key -> name)."""
        found = self.layers.get(key)
        if found is None:
            return SiteLayers(why="it has not been mapped (it never ran in an eager forward here)")
        feeding = self.inputs.get(key)
        return dataclasses.replace(found, input_site=name_of.get(feeding)) if feeding is not None else found

    # -- the walks
    def _map(self, key: Any, fn: Any, graph: _Graph | None, problem: str | None, params: dict[int, tuple[str, ...]],
             outputs: dict[Any, Hashable]) -> tuple[SiteLayers, Hashable | None]:
        if fn is None:
            producers, norm = _sequential_producer(self.model, key)
            return SiteLayers(producers=producers, norm=norm,
                              why="it first ran without an autograd graph (under no_grad, or in a reentrant "
                                  "checkpoint)"), None
        producer, norm, feeding, nonneg, coupled, why = self._back(fn, params, outputs)
        producers = (producer,) if producer is not None else ()
        consumers: list[str] = []
        if why is None and coupled is None:
            if graph is None:
                why = problem
            elif fn not in graph.users and fn not in graph.roots:
                why = "its output does not reach what the forward of the model returned"
            else:
                partners, consumers, coupled, why = _readers(fn, graph, params, self.model)
                producers += tuple(p for p in partners if p not in producers)
        mapped = {*producers, norm, *consumers}
        repeated = {name.rpartition(".")[0] for name, n in (graph.uses.items() if graph else ()) if n > 1}
        return SiteLayers(producers=producers, norm=norm, consumers=tuple(consumers), input_nonnegative=nonneg,
                          coupled=coupled, why=why, repeated=tuple(sorted(repeated & mapped))), feeding

    def _back(self, fn: Any, params: dict[int, tuple[str, ...]], outputs: dict[Any, Hashable]
              ) -> tuple[str | None, str | None, Hashable | None, bool, str | None, str | None]:
        """(producer, norm, the site its input is, that input is >= 0, coupled, why) back from a site's output."""
        nodes, found = _grad_inputs(fn, params)
        node = nodes[0] if len(nodes) == 1 and not found else None if found else _only_layer(fn, params, outputs)
        if node is None:
            return None, None, None, False, None, "the activation reads several tensors (a weight of its own?)"
        norm = None
        while True:  # the layer, or a norm and then the layer
            node, stop = _through(node, params)
            if stop == "sum":
                return None, norm, None, False, "its input is a sum of tensors (a residual add)", None
            if stop is not None:
                return None, norm, None, False, None, stop
            inputs, found = _grad_inputs(node, params)
            path = _module_of(params, found) if found else None
            if path is None:
                return None, norm, None, False, None, \
                    f"no single layer feeds it (a {_op(node)} op)"
            if is_norm(self.model.get_submodule(path)):
                if norm is not None:
                    return None, norm, None, False, None, "two norms between the layer and the activation"
                norm = path
                if len(inputs) != 1:
                    return None, norm, None, False, None, "its norm reads several tensors"
                node = inputs[0]
                continue
            if len(inputs) > 1:
                return None, norm, None, False, None, f"its layer {path!r} reads several tensors"
            source = _skip(inputs[0], SIGN_KEEPING) if inputs else None
            feeding = outputs.get(source) if source is not None else None
            nonneg = source is not None and (_name(source).startswith(NONNEGATIVE_OPS) or feeding in self.nonnegative)
            return path, norm, feeding, nonneg, None, None


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    """The tensors in a forward's output: nested tuples, lists and mappings (Hugging Face's ModelOutput)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from _tensors(item)


def _skip(node: Any, ops: tuple[str, ...]) -> Any:
    """Follow single-input ops named in `ops` back from `node`."""
    for _ in range(DEPTH):
        if not _name(node).startswith(ops):
            return node
        nodes = [c for c, _ in node.next_functions if c is not None]
        if len(nodes) != 1:
            return node
        node = nodes[0]
    return node


def _through(node: Any, params: dict[int, tuple[str, ...]]) -> tuple[Any, str | None]:
    """Follow ops that keep units apart; (the first other node, None) or (None, why the walk stopped;
    "sum" for an add of tensors)."""
    for _ in range(DEPTH):
        name = _name(node)
        if name.startswith(SUMS):
            return None, "sum"
        if node is None or not name.startswith(THROUGH):
            return node, None
        nodes, found = _grad_inputs(node, params)
        if found or len(nodes) != 1:
            return None, "its input is a product of tensors that both need grad (a gate?)"
        node = nodes[0]
    return None, "no layer found near it in the autograd graph"


def _stops(fn: Any, params: dict[int, tuple[str, ...]], outputs: dict[Any, Hashable]) -> Iterator[Any]:
    """Breadth first back from `fn`, through neither layers (nodes reading parameters) nor other sites'
    outputs: yields each of those where the walk stops, then None if it ran out of depth first."""
    frontier, seen = [fn], set()
    for _ in range(DEPTH):
        nxt = []
        for node in frontier:
            if node is None or node in seen:
                continue
            seen.add(node)
            if node is not fn and node in outputs:
                yield node
                continue
            nodes, found = _grad_inputs(node, params)
            if found:
                yield node
            else:
                nxt.extend(nodes)
        frontier = nxt
        if not frontier:
            return
    yield None


def _only_layer(fn: Any, params: dict[int, tuple[str, ...]], outputs: dict[Any, Hashable]) -> Any:
    """An activation made of several ops (transformers' NewGELUActivation: 0.5 * x * (1 + tanh(...))): the
    one layer node that every path back from its output reaches, or None."""
    stops = set(_stops(fn, params, outputs))
    if None in stops or any(node in outputs for node in stops) or len(stops) != 1:
        return None
    return stops.pop()


def _partner(node: Any, params: dict[int, tuple[str, ...]]) -> str | None:
    """The layer whose output `node` is, through ops that keep units apart; None if it is not one layer's."""
    node, stop = _through(node, params)
    if stop is not None or node is None:
        return None
    _, found = _grad_inputs(node, params)
    return _module_of(params, found) if found else None


def _readers(fn: Any, graph: _Graph, params: dict[int, tuple[str, ...]], model: nn.Module
             ) -> tuple[list[str], list[str], str | None, str | None]:
    """(gate partners, consumers, coupled, why) forward from a site's output."""
    partners: list[str] = []
    consumers: set[str] = set()
    frontier, seen = [fn], {fn}
    while frontier:
        node = frontier.pop()
        if node in graph.roots:
            return partners, [], None, "the forward of the model returns it without a layer reading it"
        for user in graph.users.get(node, ()):
            if user in seen:
                continue
            name = _name(user)
            inputs, found = _grad_inputs(user, params)
            if found:  # a node reading parameters: a layer, if it is one reading these units alone
                path = _module_of(params, found)
                m = model.get_submodule(path) if path is not None else None
                if m is None or not is_layer(m):
                    what = f"{path!r} ({type(m).__name__})" if m is not None else f"a {name} op"
                    return partners, [], None, f"{what} reads it: only Linear, Conv and HF Conv1D layers are mapped"
                if len(inputs) != 1:
                    return partners, [], None, f"{path!r} reads it with another tensor that needs grad (a weight " \
                                               f"computed in its forward, such as weight norm's?)"
                consumers.add(path)
                continue
            if name.startswith(SUMS):
                return partners, [], "its output is added to another tensor (a residual add)", None
            if name.startswith(CONCATS):
                return partners, [], "its output is concatenated with other tensors", None
            if not name.startswith(ZERO_KEEPING) or name.startswith("DivBackward") and \
                    user.next_functions[0][0] is not node:   # a division by it does not send 0 to 0
                return partners, [], None, f"its output goes through a {_op(user)} op " \
                                           f"before any layer reads it"
            others = [i for i in inputs if i is not node]
            if others:  # a product (or quotient) with another tensor that needs grad
                partner = _partner(others[0], params) if len(others) == 1 and name.startswith("MulBackward") else None
                if partner is None:
                    return partners, [], None, "it is multiplied by a tensor that is not one layer's output"
                if partner not in partners:
                    partners.append(partner)
            seen.add(user)
            frontier.append(user)
    return partners, sorted(consumers), None, None


# Modules between a layer and an activation in an nn.Sequential that keep units apart.
PASSING = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


def _sequential_producer(model: nn.Module, key: Any) -> tuple[tuple[str, ...], str | None]:
    """Without a graph: (the layer, the norm) before an activation module in a plain nn.Sequential, whose
    forward runs its children in order, each on the previous one's output (through dropout, one norm)."""
    if getattr(key, "function", True) is not None or not key.path:
        return (), None
    parent = key.path.rpartition(".")[0]
    holder = model.get_submodule(parent)
    if type(holder) is not nn.Sequential:
        return (), None
    act = model.get_submodule(key.path)
    children = [(f"{parent}.{n}" if parent else n, m) for n, m in holder._modules.items()]
    at = [i for i, (_, m) in enumerate(children) if m is act]
    if len(at) != 1:
        return (), None
    before, norm = children[:at[0]], None
    while before and isinstance(before[-1][1], PASSING):
        before.pop()
    if before and is_norm(before[-1][1]):
        norm = before.pop()[0]
        while before and isinstance(before[-1][1], PASSING):
            before.pop()
    if not before or not is_layer(before[-1][1]):
        return (), None
    return (before[-1][0],), norm
