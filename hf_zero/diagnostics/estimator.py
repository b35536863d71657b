"""Per-rank memory estimates for each ZeRO stage and offload choice (pure arithmetic).

Model states follow ZeRO's accounting, which ``engine.memory_breakdown()`` reproduces exactly
for stages 0-2 (tests/test_estimator.py): with Psi parameters and N data-parallel ranks,

| stage | fp32 training (params/grads/Adam) | mixed precision (K = 12: fp32 master + Adam) |
|---|---|---|
| 0 | 16 Psi | 16 Psi |
| 1 | 8 Psi + 8 Psi/N | 4 Psi + 12 Psi/N |
| 2 | 4 Psi + 12 Psi/N | 2 Psi + 14 Psi/N |
| 3 | 16 Psi/N | 16 Psi/N |

Optimizer offload (hf_zero/offload/) moves the optimizer part to the host (cpu) or to files
with host swap buffers (nvme): fp32 masters and Adam moments, 12 bytes per owned parameter
(the master is a host copy whenever the parameters live on an accelerator or are not fp32;
fp32 parameters already in host memory are their own masters: 8 bytes). Gradient partitions
stay with the parameters (the update brings them to the host one sub-group at a time);
:func:`optimizer_offload_bytes` is the exact per-rank figure that ``engine.memory_breakdown()``
reports as ``offload_host`` / ``offload_nvme``. At stage 3 an offload row also moves the
parameter shards (``offload_param`` on the same device, as ZeRO-Infinity configs do;
``memory_breakdown()`` reports them as ``param_host`` / ``param_nvme``). Activations use the
per-layer estimate for transformer blocks of Korthikanti et al. 2022
(s*b*h*(34 + 5*a*s/h) bytes in 16-bit), which is not validated here.
"""

from __future__ import annotations

from dataclasses import dataclass

OFFLOADS = ("none", "cpu", "nvme")
SWAP_ALIGN = 4096   # hf_zero.offload.swapper.ALIGN (kept import-free: this module is pure arithmetic)


@dataclass(frozen=True)
class ModelShape:
    num_params: int
    hidden: int
    layers: int
    heads: int
    vocab: int
    largest_layer_params: int


@dataclass(frozen=True)
class Estimate:
    stage: int
    offload: str                 # optimizer (and, at stage 3, parameter) offload device
    device_model_states: float   # bytes per rank on the accelerator
    host_model_states: float     # bytes per rank in host memory
    buffers: float               # communication / gather buffers per rank (device), plus nvme swap buffers (host)
    activations: float           # per rank, for the given micro-batch
    activations_checkpointed: float
    nvme_model_states: float = 0.0   # bytes per rank in NVMe swap files

    @property
    def device_total(self) -> float:
        return self.device_model_states + self.buffers + self.activations

    @property
    def device_total_checkpointed(self) -> float:
        return self.device_model_states + self.buffers + self.activations_checkpointed


def model_state_bytes(stage: int, num_params: int, world: int, mixed: bool) -> tuple[float, float, float]:
    """(params, grads, optimizer incl. master) bytes per rank."""
    psi, n = float(num_params), float(world)
    p_bytes, k = (2.0, 12.0) if mixed else (4.0, 8.0)
    params = psi * p_bytes / (n if stage >= 3 else 1.0)
    grads = psi * p_bytes / (n if stage >= 2 else 1.0)
    optim = psi * k / (n if stage >= 1 else 1.0)
    return params, grads, optim


def activation_bytes(shape: ModelShape, micro_batch: int, seq: int, mixed: bool, checkpointed: bool) -> float:
    s, b, h, a, layers = seq, micro_batch, shape.hidden, shape.heads, shape.layers
    scale = 1.0 if mixed else 2.0             # the 16-bit formula, doubled for fp32
    per_layer = s * b * h * (34 + 5 * a * s / h) * scale
    logits = s * b * shape.vocab * (2 if mixed else 4) * 2   # logits and their gradient
    if checkpointed:   # keep each block's input; recompute one block at a time
        return layers * s * b * h * 2 * scale + per_layer + logits
    return layers * per_layer + logits


def optimizer_offload_bytes(owned_numel: int, device: str, master_copy: bool, sub_group_size: int = 1_000_000_000,
                            buffer_count: int = 4, num_states: int = 2) -> dict[str, int]:
    """Bytes one rank's optimizer offload holds, by location, for ``owned_numel`` owned
    parameters: ``offload_host`` (cpu: masters if copied + ``num_states`` Adam moments; nvme:
    the swap buffers) and ``offload_nvme`` (the swap files; I/O padding ignored)."""
    kinds = num_states + (1 if master_copy else 0)
    if device == "cpu":
        return {"offload_host": 4 * kinds * owned_numel, "offload_nvme": 0}
    if device == "nvme":   # every region padded to the O_DIRECT alignment (swapper.py)
        def padded(numel: int) -> int:
            return -(-4 * numel // SWAP_ALIGN) * SWAP_ALIGN

        full, last = divmod(owned_numel, sub_group_size)
        files = kinds * (full * padded(sub_group_size) + (padded(last) if last else 0))
        buffer = kinds * padded(min(sub_group_size, owned_numel)) + SWAP_ALIGN   # + alignment slack
        return {"offload_host": max(2, buffer_count) * buffer, "offload_nvme": files}
    return {"offload_host": 0, "offload_nvme": 0}


def estimate(shape: ModelShape, world: int, stage: int, offload: str = "none", mixed: bool = True,
             micro_batch: int = 1, seq: int = 2048, reduce_bucket_size: float = 5e8,
             prefetch_bucket_size: float = 5e7, sub_group_size: int = 1_000_000_000,
             buffer_count: int = 4) -> Estimate:
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    params, grads, optim = model_state_bytes(stage, shape.num_params, world, mixed)
    p_bytes = 2 if mixed else 4
    device, host, nvme, swap_buffers = params + grads + optim, 0.0, 0.0, 0.0
    if offload != "none":   # masters + Adam leave the accelerator; gradient partitions stay
        device -= optim
        # On an accelerator the fp32 master is always a host copy (12 bytes per owned parameter).
        moved = optimizer_offload_bytes(int(shape.num_params / (world if stage >= 1 else 1)), offload, True,
                                        sub_group_size, buffer_count)
        host += moved["offload_host"] if offload == "cpu" else 0.0
        swap_buffers = moved["offload_host"] if offload == "nvme" else 0.0
        nvme += moved["offload_nvme"]
        if stage == 3:   # parameter shards offloaded too (offload_param on the same device)
            device -= params
            host += params if offload == "cpu" else 0.0
            nvme += params if offload == "nvme" else 0.0
    # Stage 0-2: at most two reduction buckets in flight; stage 3 adds gathered parameters
    # (prefetch window plus the largest layer).
    buffers = 2 * min(reduce_bucket_size, shape.num_params) * p_bytes
    if stage == 3:
        buffers += (min(prefetch_bucket_size, shape.num_params) + shape.largest_layer_params) * p_bytes
    return Estimate(stage, offload, device, host + swap_buffers, buffers,
                    activation_bytes(shape, micro_batch, seq, mixed, False),
                    activation_bytes(shape, micro_batch, seq, mixed, True), nvme)


def largest_model_fitting(device_bytes: float, world: int, stage: int, offload: str, mixed: bool) -> float:
    """Parameters whose model states alone fit in ``device_bytes`` per rank (no activations)."""
    per_param = estimate(ModelShape(1, 1, 1, 1, 1, 0), world, stage, offload, mixed,
                         reduce_bucket_size=0, prefetch_bucket_size=0).device_model_states
    return float("inf") if per_param == 0 else device_bytes / per_param


def deepspeed_estimate(stage: int, num_params: int, largest_layer_params: int, gpus: int,
                       offload: str) -> float:
    """DeepSpeed's per-GPU model-state estimate (its estimate_zero2/3_model_states_mem_needs
    with zero_init; offload 'cpu' = optimizer and, at stage 3, parameters), for docs/diagnostics.md."""
    if stage <= 2:
        return 2 * num_params if offload != "none" else 4 * num_params + 16 * num_params / gpus
    if offload != "none":
        return 4 * largest_layer_params
    return 4 * largest_layer_params + 18 * num_params / gpus


@dataclass(frozen=True)
class HybridEstimate:
    """One layout across ``nodes`` nodes of ``per_node`` ranks, per rank ([Note: hybrid
    sharding] in docs/design.md; bytes are the logical payload comm_stats() counts)."""

    layout: str                 # "plain", "mics" (mics_shard_size = per_node) or "hpz"
    stage: int
    model_states: float         # bytes per rank on the device
    inter_node_bytes: float     # per step, through collectives whose groups span nodes
    intra_node_bytes: float     # per step, inside a node


def hybrid_estimates(num_params: int, nodes: int, per_node: int, mixed: bool) -> list[HybridEstimate]:
    """Plain ZeRO over all ranks vs MiCS with one shard group per node (stages 1-3) and hpZ
    with one secondary group per node (stage 3). Stage 3 counts the backward gathers as a
    whole model (no block kept gathered between forward and backward): an upper bound."""
    world, model = nodes * per_node, float(num_params) * (2 if mixed else 4)

    def split(across_all: float, in_node: float) -> tuple[float, float]:
        """(inter-node, intra-node): with one node, everything stays inside it."""
        return (across_all, in_node) if nodes > 1 else (0.0, across_all + in_node)

    out = []
    for stage in (1, 2, 3):
        gathers = 2 * model if stage == 3 else model
        plain = sum(model_state_bytes(stage, num_params, world, mixed))
        out.append(HybridEstimate("plain", stage, plain, *split(model + gathers, 0.0)))
        mics = sum(model_state_bytes(stage, num_params, per_node, mixed))
        out.append(HybridEstimate("mics", stage, mics, *split(2 * model / per_node, model + gathers)))
    # hpZ: plain stage 3 plus the secondary copy (1/k of the model); forward gathers and the
    # reduce-scatter span every rank, backward gathers stay in the node.
    out.append(HybridEstimate("hpz", 3, out[4].model_states + model / per_node, *split(2 * model, model)))
    return out
