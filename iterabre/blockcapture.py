"""Hooks and state of block-wise reconstruction: (pruned input, dense target) pairs in a bounded buffer.

For one trained unit (one or two kept blocks next to a gap, see iterabre.blockrecon) a pair
is, per token position, the residual stream entering the unit in the *pruned* student and
the residual stream the *dense* teacher has at the point the unit must reproduce (global
propagation). Both come from forward passes that stop as soon as the needed block is
reached, so later blocks and the LM head never run.

Memory cap. All pairs live in one `PairBuffer` allocated once per phase with room for
`cap` token positions (whole windows: floor(cap / T) rows of T tokens), i.e.
2 x rows x T x hidden x bytes per element (SmolLM2-135M, cap 4096, float32: 18 MiB). When
more tokens are asked for, they are captured and consumed chunk by chunk into the same
storage, so the buffer never grows with the token count. Beyond it, a capture holds one
batch's activations of one forward pass, and `CallCache` a few recorded block calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from iterabre.activations import BlockCall, blocks_as_identity, capture_stack
from iterabre.errors import IterabreError
from iterabre.reconstruct import forward_capture
from iterabre.surgery import decoder_blocks

CALL_CACHE_SIZE = 8  # distinct mask patterns remembered (full windows need one)


class _Stop(Exception):
    """Raised by the pre-hook once the unit's input is recorded: nothing after it needs to run."""


def block_input(model: nn.Module, block: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden states [B, T, d] entering `block` in `model`'s forward; the pass stops there."""
    got = {}

    def hook(module, args, kwargs):
        got["x"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in got:
        raise IterabreError("the forward pass never reached the block to train.",
                            "check that the block belongs to this model")
    return got["x"]


def block_output(model: nn.Module, block: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden states [B, T, d] leaving `block` in `model`'s forward; the pass stops there."""
    return forward_capture(model, block, ids, mask)["out"]


class CallCache:
    """The extra inputs each block gets (masks per layer type, rotary tables), per mask pattern.

    Recorded by the model's own forward with every block as an identity (the price of the
    embedding and the final norm), so no model's mask or rotary code is re-implemented and a
    unit of two blocks of different layer types (Gemma2: sliding, global) gets each its own.
    """

    def __init__(self, model: nn.Module, positions: tuple[int, ...]):
        self.model, self.positions = model, positions
        self.memo: OrderedDict[tuple, dict[int, BlockCall]] = OrderedDict()

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[int, BlockCall]:
        """{position: BlockCall} for a batch of windows ids / mask [b, T]."""
        key = (tuple(mask.shape), mask.cpu().numpy().tobytes())
        if key not in self.memo:
            with torch.no_grad(), blocks_as_identity(self.model):
                cap = capture_stack(self.model, ids, mask)
            self.memo[key] = {p: cap.calls[p] for p in self.positions}
            if len(self.memo) > CALL_CACHE_SIZE:
                self.memo.popitem(last=False)
        return self.memo[key]


class PairBuffer:
    """Storage for at most `cap_rows` windows of (input, target) pairs, reused chunk after chunk.

    `peak_bytes` / `peak_tokens` record the largest storage ever allocated: the measured
    memory of the captured pairs (the tests check it against the cap).
    """

    def __init__(self, cap_tokens: int, seq_len: int):
        if cap_tokens < seq_len:
            raise IterabreError(f"block_recon_buffer={cap_tokens} tokens cannot hold one {seq_len}-token window.",
                                f"pass block_recon_buffer >= {seq_len}")
        self.cap_rows = cap_tokens // seq_len
        self.inputs: torch.Tensor | None = None  # [rows, T, d]
        self.targets: torch.Tensor | None = None  # [rows, T, d]
        self.peak_bytes, self.peak_tokens = 0, 0

    def storage(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) views of `rows` <= cap_rows windows shaped like `like` [b, T, d]."""
        if rows > self.cap_rows:
            raise ValueError(f"{rows} rows exceed the buffer's {self.cap_rows}")
        shape = (rows, *like.shape[1:])
        if (self.inputs is None or self.inputs.shape[0] < rows or self.inputs.shape[1:] != like.shape[1:]
                or self.inputs.dtype != like.dtype or self.inputs.device != like.device):
            self.inputs = self.targets = None  # free the old storage before allocating the new one
            self.inputs = torch.empty(shape, dtype=like.dtype, device=like.device)
            self.targets = torch.empty(shape, dtype=like.dtype, device=like.device)
            nbytes = 2 * self.inputs.numel() * self.inputs.element_size()
            self.peak_bytes = max(self.peak_bytes, nbytes)
            self.peak_tokens = max(self.peak_tokens, rows * like.shape[1])
        return self.inputs[:rows], self.targets[:rows]

    def release(self) -> None:
        """Drop the storage (the peak record stays)."""
        self.inputs = self.targets = None


class PairStream:
    """Captures one unit's pairs for a set of windows, chunk by chunk, into a shared PairBuffer."""

    def __init__(self, student: nn.Module, teacher: nn.Module, first: int, target: int,
                 buffer: PairBuffer, batch_size: int):
        self.student, self.teacher = student, teacher
        self.first = decoder_blocks(student)[first]  # the unit's first block: its input is the pair's input
        self.target = decoder_blocks(teacher)[target]  # the teacher block whose output is the pair's target
        self.buffer, self.batch_size = buffer, batch_size

    @torch.no_grad()
    def _fill(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Capture pairs for ids / mask [n, T] (n <= cap_rows) into the buffer -> (inputs, targets) [n, T, d]."""
        s_dev, t_dev = _device(self.student), _device(self.teacher)
        inputs = targets = None
        for start in range(0, ids.shape[0], self.batch_size):
            b_ids, b_mask = ids[start:start + self.batch_size], mask[start:start + self.batch_size]
            x = block_input(self.student, self.first, b_ids.to(s_dev), b_mask.to(s_dev))  # [b, T, d]
            t = block_output(self.teacher, self.target, b_ids.to(t_dev), b_mask.to(t_dev))  # [b, T, d]
            if inputs is None:
                inputs, targets = self.buffer.storage(ids.shape[0], x)
            inputs[start:start + len(b_ids)] = x
            targets[start:start + len(b_ids)] = t.to(x.device, x.dtype)
        return inputs, targets

    def chunks(self, ids: torch.Tensor, mask: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        """(rows, inputs, targets) per chunk of at most cap_rows windows; `rows` index ids / mask."""
        student_mode, teacher_mode = self.student.training, self.teacher.training
        rows = self.buffer.cap_rows
        for start in range(0, ids.shape[0], rows):
            idx = torch.arange(start, min(start + rows, ids.shape[0]))
            self.student.eval()
            self.teacher.eval()
            try:
                inputs, targets = self._fill(ids[idx], mask[idx])
            finally:
                self.student.train(student_mode)
                self.teacher.train(teacher_mode)
            yield idx, inputs, targets


def _device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    return next(model.parameters()).device
