"""What the TF graph and ONNX interpreters share: the compiled-op record, the execution loop, the error for models
they cannot convert, and TensorFlow's SAME padding (ONNX's ``auto_pad`` uses it too).

A converted graph is a list of steps in execution order, each a :class:`CompiledOp` and the names of the values it
writes. :class:`GraphModule` runs them over a dict of named values and deletes every value after its last reader, as
planned once when the module is built, so a forward holds only the activations still needed (plus whatever autograd
keeps for the backward).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from redteam.errors import RedteamError
from redteam.runtime import channels_last


class UnsupportedModelError(RedteamError, NotImplementedError):
    """The model uses ops (or op settings) that a converter has no torch rule for."""


@dataclass
class CompiledOp:
    """A compiled node: ``fn(*input tensors)`` -> one tensor, or a tuple with one tensor per output."""

    fn: Callable[..., Tensor | tuple[Tensor, ...]]
    inputs: list[str]


#: The names a step writes (``""`` skips an output nobody reads) and the op computing them.
Step = tuple[tuple[str, ...], CompiledOp]


def release_schedule(plan: Sequence[Step], keep: Sequence[str]) -> list[tuple[str, ...]]:
    """For each step, the values to delete once it has run: those no later step reads (a value nobody reads goes
    right after the step writing it). Names in ``keep`` (the graph outputs) are never deleted."""
    last_step: dict[str, int] = {}
    for step, (outputs, op) in enumerate(plan):
        for name in (*outputs, *op.inputs):  # steps run in order, so a later read overwrites an earlier one
            if name:
                last_step[name] = step
    released: list[list[str]] = [[] for _ in plan]
    for name, step in last_step.items():
        if name not in keep:
            released[step].append(name)
    return [tuple(names) for names in released]


class GraphModule(nn.Module):
    """Base of converted graphs: float constants live in ``weights``; ``forward`` takes the graph inputs in order and
    returns its outputs in order (a single tensor when the graph has one output).

    Subclasses compile their nodes into steps, hand them to :meth:`set_plan` once, and may override
    :meth:`read_output` (e.g. to convert an output's layout).
    """

    def __init__(self, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.weights = nn.ParameterDict()
        self.input_names = input_names
        self.output_names = output_names
        self._plan: list[Step] = []
        self._released: list[tuple[str, ...]] = []

    def set_plan(self, plan: list[Step]) -> None:
        self._plan = plan
        self._released = release_schedule(plan, self.output_names)

    def __deepcopy__(self, memo: dict) -> GraphModule:
        # The compiled ops close over this module's weights: a copy would silently keep computing with them.
        raise TypeError("a converted graph cannot be deep-copied; load the target again for an independent copy.")

    def run(self, inputs: Sequence[Tensor]) -> dict[str, Tensor]:
        """Execute the plan -> the values still held at the end: the outputs (and inputs no step reads)."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the graph takes {len(self.input_names)} inputs ({self.input_names}), got {len(inputs)}")
        values: dict[str, Tensor] = dict(zip(self.input_names, map(channels_last, inputs)))
        for (outputs, op), released in zip(self._plan, self._released):
            result = op.fn(*(values[name] for name in op.inputs))
            for name, value in zip(outputs, result if isinstance(result, tuple) else (result,)):
                if name:
                    values[name] = value
            for name in released:
                del values[name]
        return values

    def read_output(self, name: str, values: dict[str, Tensor]) -> Tensor:
        return values[name]

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        values = self.run(inputs)
        outputs = tuple(self.read_output(name, values) for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) along one spatial axis; the extra pixel goes after."""
    effective = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2
