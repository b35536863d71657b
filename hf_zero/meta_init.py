"""Partitioned construction: build a model without materialising it, shard it as it is made.

[Note: partitioned construction]
``with hf_zero.zero_init(): model = AutoModelForCausalLM.from_config(cfg)`` builds every
parameter and buffer on the meta device: no memory and no initialisation. ``initialize``
(stage 3) then builds each rank's shards parameter by parameter; a value is produced only
when its shard is built, this rank's slice is copied and the value is dropped. Values come
from a ``ParameterSource``:
- random initialisation: a *scratch* deep copy of one unit (a transformer block, or one
  root module such as the embedding) is materialised and initialised the way transformers
  does it (``_init_weights`` children before parents, so a parent's re-initialisation such
  as GPT-2's scaled ``c_proj`` applies; peft adapters through ``reset_lora_parameters``;
  plain modules through ``reset_parameters``), under an RNG seeded from one seed (rank 0's)
  and the unit's name. Every rank therefore computes the same values whatever order it
  builds them in, and the result does not depend on the world size. Peak: the shards
  plus one unit.
- pretrained weights (``hf_zero.from_pretrained``): a ``PretrainedWeights`` plan
  (pretrained_weights.py: transformers' own key renaming and weight conversions) says which
  checkpoint bytes make each parameter; each rank reads only the element ranges covering its
  own slices (experts fused at load time: only the experts its slices cover). Parameters
  missing from the files (e.g. new LoRA adapters) are initialised as above; persistent
  buffers the files hold are loaded.
  A read that fails on one rank (a file truncated or removed since ``from_pretrained`` read
  its header, an I/O error) must not leave the other ranks waiting in construction's next
  collective: the source keeps the first failure, fills what is left with zeros (no more
  reads) and the engine agrees once, when construction's reads are over
  (``agree_on_reads``: one 4-byte all-reduce), so every rank raises the same error naming
  the rank, the file and the parameter. Header, plan and shape checks run earlier, in
  ``from_pretrained``, which every rank calls and which agrees on its outcome the same way.
Stages 0-2 hold whole parameters: the source materialises each parameter in full instead.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Protocol, cast

import torch
from torch import nn

from hf_zero.comm import rank_local_call

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer
    from transformers import PreTrainedModel


class _ResetsParameters(Protocol):   # torch's layers: nn.Linear, nn.Embedding, nn.LayerNorm, ...
    def reset_parameters(self) -> None: ...


logger = logging.getLogger(__name__)


@contextlib.contextmanager
def zero_init(seed: Optional[int] = None) -> Iterator[None]:
    """Build models on the meta device; ``hf_zero.initialize`` materialises them shard by shard.

    ``seed``: the initialisation seed (default: this process's ``torch.initial_seed()``);
    rank 0's value is used on every rank. Inside the block transformers' ``from_pretrained``
    (any ``PreTrainedModel`` / ``AutoModel*`` class) builds as :func:`from_pretrained` does:
    meta parameters plus the plan of its weights (partitioned_load.py).
    """
    global _pending_seed
    from hf_zero.partitioned_load import block

    _pending_seed = torch.initial_seed() if seed is None else int(seed)
    with torch.device("meta"), block():
        yield


_pending_seed: Optional[int] = None


def pending_seed() -> int:
    """The seed of the last ``zero_init`` block (else this process's initial seed)."""
    seed = torch.initial_seed() if _pending_seed is None else _pending_seed
    return seed % (2**62)   # fits the int64 tensor it is broadcast in


@rank_local_call("hf_zero.from_pretrained")   # every rank calls it; one rank's failure is every rank's error
def from_pretrained(path: str | Path, model_class=None, ignore_mismatched_sizes: bool = False,
                    **kwargs) -> nn.Module:
    """A model whose weights ``initialize`` reads slice by slice from ``path`` (HF safetensors).

    The checkpoint is mapped onto the model by transformers' own loading rules (see
    pretrained_weights.py): renamed and converted keys, ``base_model_prefix``, tied weights;
    missing and unexpected keys are logged by name, a shape mismatch raises unless
    ``ignore_mismatched_sizes`` (then the parameter keeps its initialisation).
    ``model_class``: an ``AutoModel*`` class (default ``AutoModelForCausalLM``) or a concrete
    ``PreTrainedModel`` class. ``kwargs`` as transformers' ``from_pretrained`` takes them:
    ``config``, ``dtype`` / ``torch_dtype`` (default "auto": the checkpoint's),
    ``attn_implementation``, ``generation_config``, config overrides
    (partitioned_load.build_meta_model).

    With a process group, every rank calls it (as ``initialize``): a failure on some ranks
    (a directory, file or header that one rank cannot read) is then every rank's error."""
    from transformers import AutoModelForCausalLM

    from hf_zero.partitioned_load import build_meta_model, guard_unbuilt
    from hf_zero.pretrained_weights import PretrainedWeights, checkpoint_files

    path = Path(path)
    files = checkpoint_files(path)   # a directory without weights fails before any model is built
    model = build_meta_model(path, files, model_class or AutoModelForCausalLM, kwargs)
    model._hf_zero_weights = PretrainedWeights(path, model, ignore_mismatched_sizes)
    model.eval()   # as transformers' from_pretrained leaves it (dropout off until .train())
    guard_unbuilt(model)
    return model


def set_parameter_tensor(param: nn.Parameter, tensor: torch.Tensor) -> None:
    """``param.data = tensor``, also for a meta parameter (``.data`` cannot change device):
    the Parameter object stays the same, so optimizers and modules holding it are unaffected."""
    if not param.is_meta:
        param.data = tensor
        return
    attributes = dict(param.__dict__)
    torch.utils.swap_tensors(param, nn.Parameter(tensor, requires_grad=param.requires_grad))
    param.__dict__.update(attributes)


def has_meta_parameters(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers())


class ParameterSource:
    """Values of a meta-built model's parameters, one slice at a time (see module note)."""

    def __init__(self, model: nn.Module, unit_modules: list[nn.Module], seed: int,
                 device: torch.device = torch.device("cpu")):
        self.model, self.seed, self.device = model, seed, device
        self.files = getattr(model, "_hf_zero_weights", None)   # a PretrainedWeights plan, or None
        names = {id(m): n for n, m in model.named_modules()}
        self._unit_of: dict[int, tuple[str, nn.Module]] = {}
        in_unit = set()
        for unit in unit_modules:
            for p in unit.parameters():
                self._unit_of[id(p)] = (names[id(unit)], unit)
                in_unit.add(id(p))
        for name, module in model.named_modules():
            for p in module.parameters(recurse=False):
                if id(p) not in in_unit:
                    self._unit_of.setdefault(id(p), (name, module))
        self._scratch_key: Optional[str] = None
        self._scratch: dict[int, torch.Tensor] = {}    # id(original param) -> materialised value
        self._initializer = _nearest_initializers(model)
        self.read_failure: Optional[Exception] = None   # the first failed checkpoint read (see note)

    def read_into(self, name: str, param: nn.Parameter, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + out.numel()) of the flattened value of ``param`` (named
        ``name``) into the 1D ``out`` (cast to its dtype)."""
        if self.files is not None:
            key = self.files.key_for(name)
            if key is not None:
                self._read_checkpoint(key, name, start, out)
                return
        out.copy_(self._initialised(param).reshape(-1).narrow(0, start, out.numel()))

    def _read_checkpoint(self, key: str, name: str, start: int, out: torch.Tensor) -> None:
        """Read from the checkpoint; a failure is kept for ``agree_on_reads`` (module note)."""
        if self.read_failure is None:
            assert self.files is not None   # read_into only reads keys of the plan
            try:
                self.files.read_into(key, start, out)
                return
            except Exception as err:
                from hf_zero.pretrained_weights import CheckpointReadError

                detail = str(err) if isinstance(err, CheckpointReadError) else f"{type(err).__name__}: {err}"
                self.read_failure = CheckpointReadError(f"loading parameter '{name}': {detail}")
                self.read_failure.__cause__ = err
        out.zero_()   # never used: every rank raises at agree_on_reads

    def agree_on_reads(self, comm) -> None:
        """Every rank calls this once its construction reads are over: a read that failed on
        any rank is every rank's error (comm.agree_on_failure), raised here."""
        from hf_zero.comm import agree_on_failure

        # (the same words on every rank: each rank's error names its own file)
        agree_on_failure(comm, self.read_failure, "hf_zero.initialize (reading the pretrained weights)")

    def full(self, name: str, param: nn.Parameter) -> torch.Tensor:
        out = torch.empty(param.numel(), dtype=param.dtype, device=self.device)
        self.read_into(name, param, 0, out)
        return out.view(param.shape)

    def close(self) -> None:
        """Drop the scratch unit and open files (construction is over)."""
        self._scratch, self._scratch_key = {}, None
        if self.files is not None:
            self.files.close()

    def _initialised(self, param: nn.Parameter) -> torch.Tensor:
        unit_name, unit = self._unit_of[id(param)]
        if self._scratch_key != unit_name:
            self._scratch = {}   # drop the previous unit first: peak is one unit
            self._scratch = self._materialise(unit_name, unit)
            self._scratch_key = unit_name
        return self._scratch[id(param)]

    def _materialise(self, unit_name: str, unit: nn.Module) -> dict[int, torch.Tensor]:
        originals = list(unit.parameters())
        memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device=self.device), p.requires_grad)
                for p in originals}
        scratch = copy.deepcopy(unit, memo={k: v for k, v in memo.items()})   # params replaced, rest copied
        seed = (self.seed ^ zlib.crc32(unit_name.encode())) % (2**63)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for module, original in _post_order(scratch, unit):
                _initialise_module(module, self._initializer.get(id(original)), self.model)
        return {id(p): memo[id(p)].data for p in originals}

    def materialise_buffers(self) -> None:
        """Give meta buffers real storage and their initial values (rotary tables and the like)."""
        for name, module in self.model.named_modules():
            metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
            if not metas:
                continue
            for n in metas:
                module._buffers[n] = torch.empty_like(module._buffers[n], device=self.device)
            init = self._initializer.get(id(module))
            if init is None:
                raise ValueError(f"zero_init: buffer '{name}.{metas[0]}' was built on the meta device and its "
                                 f"module {type(module).__name__} has no transformers initializer to recompute it")
            with torch.no_grad():
                init._init_weights(module)
                for n in metas:   # persistent buffers the checkpoint holds are loaded, as transformers does
                    key = self.files.key_for(f"{name}.{n}" if name else n) if self.files is not None else None
                    if key is not None and self.files is not None:
                        self._read_checkpoint(key, f"{name}.{n}", 0, module._buffers[n].view(-1))


def _nearest_initializers(model: nn.Module) -> dict[int, PreTrainedModel]:
    """id(module) -> the closest enclosing transformers PreTrainedModel (whose _init_weights applies)."""
    found: dict[int, PreTrainedModel] = {}

    def visit(module: nn.Module, current: Optional[PreTrainedModel]) -> None:
        if hasattr(module, "_init_weights") and hasattr(module, "config"):
            current = cast("PreTrainedModel", module)   # what these two attributes identify
        if current is not None:
            found[id(module)] = current
        for child in module.children():
            visit(child, current)

    visit(model, None)
    return found


def _post_order(scratch: nn.Module, original: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(scratch module, original module) pairs, children before parents."""
    pairs = []
    for (name, s), (_, o) in zip(scratch.named_children(), original.named_children()):
        pairs.extend(_post_order(s, o))
    pairs.append((scratch, original))
    return pairs


def _initialise_module(module: nn.Module, initializer: Optional[PreTrainedModel], model: nn.Module) -> None:
    # Parents come after children: a LoRA layer re-initialises its lora_A / lora_B as peft does.
    if hasattr(module, "reset_lora_parameters") and hasattr(module, "lora_A"):
        lora_layer = cast("LoraLayer", module)   # what the two attributes identify
        configs = getattr(model, "peft_config", {})
        for adapter in lora_layer.lora_A:
            init = getattr(configs.get(adapter), "init_lora_weights", True)
            lora_layer.reset_lora_parameters(adapter, init)
        return
    if initializer is not None:
        initializer._init_weights(module)
    elif hasattr(module, "reset_parameters"):
        cast(_ResetsParameters, module).reset_parameters()
    elif any(True for _ in module.parameters(recurse=False)):
        name = next(n for n, _ in module.named_parameters(recurse=False))
        raise ValueError(f"zero_init: cannot initialise parameter '{name}' of {type(module).__name__}: no "
                         "transformers _init_weights and no reset_parameters")

