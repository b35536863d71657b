"""Which parameters stage 3 gathers together: units, the persistent set, frozen groups.

[Note: stage-3 units]
A *unit* is a set of parameters gathered and released together:
- every outermost instance of the model's ``_no_split_modules`` classes (transformer
  blocks, as FSDP wraps them), or of classes marked with ``set_z3_leaf_modules``, with
  all the parameters registered below it;
- the input embeddings and the output embeddings (the head), each a unit of its own when
  it lies outside every block: on a small-hidden, large-vocabulary model they are most of
  the parameters, and a root unit would hold them through the whole pass. A head tied to
  the embeddings is registered under both, so the shared weight goes to the root;
- the *root* unit: every other parameter (the final norm, a tied embedding), gathered
  for the whole forward and backward pass;
- the *persistent* set: parameters with at most ``stage3_param_persistence_threshold``
  elements (biases, norms), gathered once and kept gathered; they are still partitioned
  for gradients and the optimizer and re-gathered after every optimizer step.
A parameter registered under two units (weights tied across blocks) belongs to the root, so
it is gathered whenever either block runs. Frozen parameters are sharded the same way
(their own groups, no gradient or optimizer state), so a LoRA model's frozen base is 1/N
per rank at rest and is gathered with its block, once per forward and once per backward;
``stage3_persist_frozen_params`` puts them in the persistent set instead (whole on every
rank, never communicated after the first gather).
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

from torch import nn

from hf_zero.comm import Collectives
from hf_zero.sharded_params import GatherState, ShardedParamGroup


logger = logging.getLogger(__name__)


class Unit:
    module: Optional[nn.Module]          # None for the root and the persistent set
    groups: list[ShardedParamGroup]      # trainable parameters, one group per optimizer group
    frozen: list[ShardedParamGroup]      # frozen parameters (at most one group)

    def __init__(self, index: int, module: Optional[nn.Module], groups: list[ShardedParamGroup],
                 frozen: list[ShardedParamGroup]):
        self.index = index               # position in the stage's unit list (trace key)
        self.module = module
        self.groups = groups
        self.frozen = frozen
        self.num_trainable = sum(len(g.params) for g in groups)
        self.numel = sum(g.full_numel for g in self.all_groups)
        # Per-backward bookkeeping (stages/stage3.py's [Note: stage-3 release rule]).
        self.ready = 0                   # trainable parameters whose gradient arrived
        self.pending_inputs = 0          # input-gradient markers registered but not yet reached
        self.hooked_backward = False     # gathered for this backward already
        self.pinned = False              # used outside its own forward: kept until the pass ends
        self.in_forward = 0              # depth of this unit's own forward calls running now

    @property
    def all_groups(self) -> list[ShardedParamGroup]:
        return self.groups + self.frozen

    @property
    def state(self) -> GatherState:
        states = {g.state for g in self.all_groups}
        if not states or states == {GatherState.GATHERED}:
            return GatherState.GATHERED
        return GatherState.RELEASED if states == {GatherState.RELEASED} else GatherState.GATHERING

    def start_gather(self) -> None:
        for g in self.all_groups:
            g.start_gather()

    def wait(self) -> None:
        for g in self.all_groups:
            g.wait()

    def gather(self) -> None:
        self.start_gather()
        self.wait()

    def release(self) -> None:
        if self.pinned:
            return
        for g in self.all_groups:
            g.release()

    def reset_backward(self) -> None:
        """End of a pass (also after a forward that raised): clear every per-pass counter."""
        self.ready, self.pending_inputs, self.hooked_backward, self.pinned = 0, 0, False, False
        self.in_forward = 0


def set_z3_leaf_modules(model: nn.Module, leaf_module_classes: Iterable[type]) -> list[nn.Module]:
    """Mark every instance of ``leaf_module_classes`` in ``model`` as a stage-3 unit of its
    own, gathered and released as one (DeepSpeed's ``deepspeed.utils.set_z3_leaf_modules``;
    e.g. an MoE block whose experts must be gathered together). Call before
    ``hf_zero.initialize``. A leaf inside a ``_no_split_modules`` block is gathered with
    that block (the outermost unit wins). Returns the marked modules."""
    classes = tuple(leaf_module_classes)
    marked = [m for m in model.modules() if isinstance(m, classes)]
    if not marked:
        raise ValueError(f"set_z3_leaf_modules: no module of {[c.__name__ for c in classes]} in the model")
    for module in marked:
        setattr(module, "_z3_leaf", True)   # read by the unit planner (nn.Module typing forbids plain attributes)
    return marked


def _no_split_names(model: nn.Module) -> set[str]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        base = getattr(model, "get_base_model", None)   # peft models keep the list on the base model
        names = set(getattr(base(), "_no_split_modules", None) or ()) if callable(base) else set()
    return names


def find_unit_modules(model: nn.Module) -> list[nn.Module]:
    """Outermost instances of the model's ``_no_split_modules`` classes and of modules
    marked by ``set_z3_leaf_modules``."""
    names = _no_split_names(model)
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in names or getattr(child, "_z3_leaf", False):
                found.append(child)
            else:
                visit(child)

    visit(model)
    if not found:
        logger.warning("hf_zero stage 3: %s names no _no_split_modules block (and no module is marked with "
                       "hf_zero.set_z3_leaf_modules): only its embeddings and head are gathered on their own, "
                       "every other parameter is in the root unit, gathered for the whole forward and backward. "
                       "Mark the repeated block class with hf_zero.set_z3_leaf_modules(model, [BlockClass]) "
                       "to bound what is gathered at once", type(model).__name__)
    return found


def _embedding_modules(model: nn.Module, blocks: list[nn.Module]) -> tuple[list[nn.Module], list[nn.Module]]:
    """([input embeddings], [head]) when the model has them outside every block and they
    share no parameter (tied weights stay in the root, gathered whenever either runs)."""
    inside = {id(m) for block in blocks for m in block.modules()}
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        usable = isinstance(module, nn.Module) and id(module) not in inside and any(True for _ in module.parameters())
        found.append([module] if usable else [])
    (embedding,), (head,) = found if all(found) else ([None], [None])
    if embedding is not None and head is not None and (
            {id(p) for p in embedding.parameters()} & {id(p) for p in head.parameters()}):
        return [], []   # tied: the shared weight belongs to the root
    return found[0], found[1]


ROOT, PERSISTENT = -1, -2   # pseudo unit indices while assigning parameters


def assign_units(model: nn.Module, unit_modules: list[nn.Module], persistence_threshold: int,
                 persist_frozen: bool = False) -> dict[int, int]:
    """id(param) -> unit index (``ROOT``, ``PERSISTENT`` or a position in ``unit_modules``)."""
    owners: dict[int, set[int]] = {}
    for i, module in enumerate(unit_modules):
        for p in module.parameters():
            owners.setdefault(id(p), set()).add(i)
    assignment = {}
    for p in model.parameters():
        found = owners.get(id(p), set())
        if p.numel() <= persistence_threshold or (persist_frozen and not p.requires_grad):
            assignment[id(p)] = PERSISTENT
        elif len(found) == 1:
            assignment[id(p)] = next(iter(found))
        else:   # not in any block, or shared between blocks: gathered for the whole pass
            assignment[id(p)] = ROOT
    return assignment


def build_units(model: nn.Module, specs: list, comm: Collectives, bucket_numel: int,
                persistence_threshold: int, source=None, persist_frozen: bool = False, store=None,
                secondary_comm: Optional[Collectives] = None
                ) -> tuple[list[Unit], Unit, Unit, list[ShardedParamGroup], list[int]]:
    """Shard every parameter into its unit, in place (``source``: values of a meta-built
    model, see meta_init.py; ``store``: where shards live, offload/param_store.py;
    ``secondary_comm``: ZeRO++ hpZ's group of k ranks, given to every group).

    Returns (block units, root, persistent set, trainable groups in gradient-ready order,
    optimizer spec index of each trainable group).
    """
    blocks = find_unit_modules(model)
    embedding, head = _embedding_modules(model, blocks)
    unit_modules = embedding + blocks + head   # build order below reverses this: backward order
    assignment = assign_units(model, unit_modules, persistence_threshold, persist_frozen)
    name_of = {id(p): n for n, p in model.named_parameters()}
    trainable_ids = {id(p) for spec in specs for p in spec.params}
    groups: list[ShardedParamGroup] = []
    group_spec: list[int] = []
    units: list[Unit] = []
    # Backward visits the last block first and the root (embeddings) last: build groups in
    # that order so bucket launches follow gradient readiness. Frozen groups have no buckets.
    order = [*reversed(range(len(unit_modules))), ROOT, PERSISTENT]
    by_index: dict[int, Unit] = {}
    for unit_index in order:
        options = dict(source=source, store=store, keep_in_memory=unit_index == PERSISTENT,
                       secondary_comm=secondary_comm)
        trainable: list[ShardedParamGroup] = []
        for spec_index, spec in enumerate(specs):
            chosen = [(p, n) for p, n in zip(spec.params, spec.names) if assignment[id(p)] == unit_index]
            if chosen:
                trainable.append(ShardedParamGroup([p for p, _ in chosen], [n for _, n in chosen],
                                                   bucket_numel, comm, **options))
                groups.append(trainable[-1])
                group_spec.append(spec_index)
        frozen_params = [p for p in model.parameters() if id(p) not in trainable_ids
                         and assignment[id(p)] == unit_index]
        frozen = [ShardedParamGroup(frozen_params, [name_of[id(p)] for p in frozen_params], bucket_numel, comm,
                                    **options)] if frozen_params else []
        module = unit_modules[unit_index] if unit_index >= 0 else None
        by_index[unit_index] = Unit(len(by_index), module, trainable, frozen)
    units = [by_index[i] for i in range(len(unit_modules))]
    for position, unit in enumerate(units):
        unit.index = position
    by_index[ROOT].index, by_index[PERSISTENT].index = len(units), len(units) + 1
    return units, by_index[ROOT], by_index[PERSISTENT], groups, group_spec

