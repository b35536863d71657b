"""ZeRO++-style int8 communication (opt-in: ``zero_quantized_gradients`` / ``zero_quantized_weights``).

Gradients: each rank quantizes every destination chunk of a bucket separately (int8 with
one fp32 scale per block), an all-to-all delivers each chunk's N quantized copies to its
owner, and the owner dequantizes and sums them in fp32 (an int8 sum would overflow).
Weights: the owner quantizes its updated chunk, every rank all-gathers int8 chunks and
scales and dequantizes into the parameters, the owner included, so all replicas stay equal
(the fp32 master keeps the exact values). Bytes on the wire: 1 + 4/block_size per element
instead of 2 (bf16) or 4 (fp32). Error per element <= max|block| / 254 per quantization
(docs/kernels.md).
"""

from __future__ import annotations

from typing import Callable

import torch

from hf_zero.comm import Collectives
from hf_zero_kernels import DEFAULT_QUANT_BLOCK_SIZE, dequantize_int8_blockwise, num_quant_blocks, \
    quantize_int8_blockwise


class _Both:
    """One wait for two async works."""

    def __init__(self, *works):
        self.works = works

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        return True


class QuantizedCollectives:
    def __init__(self, comm: Collectives, block_size: int = DEFAULT_QUANT_BLOCK_SIZE):
        self.comm = comm
        self.block_size = block_size

    def _quantize_chunks(self, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) -> int8 (N*C) and scales (N*blocks), each row quantized on its own."""
        n, c = chunks.shape
        blocks = num_quant_blocks(c, self.block_size)
        q = torch.empty(n * c, dtype=torch.int8, device=chunks.device)
        scales = torch.empty(n * blocks, dtype=torch.float32, device=chunks.device)
        for i in range(n):
            quantize_int8_blockwise(chunks[i], self.block_size,
                                    out=(q[i * c:(i + 1) * c], scales[i * blocks:(i + 1) * blocks]))
        return q, scales

    def _dequantize_row(self, q: torch.Tensor, scales: torch.Tensor, i: int, c: int, out: torch.Tensor) -> None:
        blocks = num_quant_blocks(c, self.block_size)
        dequantize_int8_blockwise(q[i * c:(i + 1) * c], scales[i * blocks:(i + 1) * blocks],
                                  block_size=self.block_size, out=out)

    def reduce_scatter_sum(self, output: torch.Tensor, input: torch.Tensor) -> tuple[object, Callable[[], None]]:
        """Start the reduction of ``input`` (1D, N chunks); the returned callable, run after
        the work's wait, writes this rank's summed chunk into ``output``."""
        n, c = self.comm.world_size, output.numel()
        q_in, s_in = self._quantize_chunks(input.view(n, c))
        q_out, s_out = torch.empty_like(q_in), torch.empty_like(s_in)
        work = _Both(self.comm.all_to_all(q_out, q_in, async_op=True),
                     self.comm.all_to_all(s_out, s_in, async_op=True))

        def finish() -> None:
            total = torch.zeros(c, dtype=torch.float32, device=output.device)
            part = torch.empty(c, dtype=torch.float32, device=output.device)
            for i in range(n):
                self._dequantize_row(q_out, s_out, i, c, part)
                total += part
            output.copy_(total)

        return work, finish

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """``output`` (N chunks) <- every rank's dequantized int8 copy of its ``input``."""
        n, c = self.comm.world_size, input.numel()
        q_in, s_in = self._quantize_chunks(input.view(1, c))
        q_out = torch.empty(n * c, dtype=torch.int8, device=input.device)
        s_out = torch.empty(n * s_in.numel(), dtype=torch.float32, device=input.device)
        _Both(self.comm.all_gather(q_out, q_in, async_op=True),
              self.comm.all_gather(s_out, s_in, async_op=True)).wait()
        for i in range(n):
            self._dequantize_row(q_out, s_out, i, c, output[i * c:(i + 1) * c])
