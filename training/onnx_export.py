"""Export a module with named tensor inputs to ONNX and check it against eager PyTorch.

One parity helper for every exported module: the check runs on fresh random inputs (not the export
example), so a graph that baked in a shape or a constant fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

OPSET = 17


@dataclass
class ParityReport:
    max_abs_diff: float
    outputs: list[str]
    batch_sizes: list[int]
    # |eager - onnx| / max(1, |eager|): the absolute difference for probabilities and unit vectors, the
    # relative one for outputs on a larger scale (watch time in seconds), where float32 rounding alone
    # exceeds an absolute tolerance.
    max_scaled_diff: float = 0.0
    per_output: dict[str, float] | None = None  # output -> its max scaled diff

    def ok(self, tol: float) -> bool:
        return self.max_scaled_diff <= tol

    def require(self, what: str, tol: float) -> "ParityReport":
        """The one parity rule of both stages: a graph over ``tol`` (scaled diff) raises instead of shipping."""
        if not self.ok(tol):
            raise RuntimeError(f"ONNX parity of the {what} failed: {self.describe()} > {tol:.0e}")
        return self

    def describe(self) -> str:
        worst = max((self.per_output or {"?": self.max_scaled_diff}).items(), key=lambda kv: kv[1])
        return (f"max scaled diff {self.max_scaled_diff:.2e} (output '{worst[0]}'), max abs diff "
                f"{self.max_abs_diff:.2e}, batch sizes {self.batch_sizes}")


def export_onnx(
    module: torch.nn.Module,
    example: dict[str, torch.Tensor],
    path: Path,
    output_names: list[str],
) -> Path:
    """Export with a dynamic batch axis (axis 0 of every input and output). Uses the TorchScript-based
    exporter (``dynamo=False``): 20-40x faster to export here and the same numerics."""
    module = module.eval()
    names = list(example)
    dynamic = {n: {0: "batch"} for n in names + output_names}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(example[n] for n in names),
            str(path),
            input_names=names,
            output_names=output_names,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    return path


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(
    module: torch.nn.Module,
    path: Path,
    make_inputs: Callable[[int], dict[str, torch.Tensor]],
    batch_sizes: tuple[int, ...] = (1, 7, 64),
) -> ParityReport:
    """Max abs difference between eager and ONNX Runtime outputs over fresh inputs of several batch sizes."""
    sess = session(path)
    out_names = [o.name for o in sess.get_outputs()]
    worst = 0.0
    per_output = dict.fromkeys(out_names, 0.0)
    module = module.eval()
    for b in batch_sizes:
        inputs = make_inputs(b)
        with torch.inference_mode():
            eager = module(*inputs.values())
        eager_list = [eager] if isinstance(eager, torch.Tensor) else list(eager)
        onnx_out = sess.run(out_names, {k: v.numpy() for k, v in inputs.items()})
        for name, e, o in zip(out_names, eager_list, onnx_out):
            if not o.size:
                continue
            diff = np.abs(e.numpy() - o)
            worst = max(worst, float(diff.max()))
            per_output[name] = max(per_output[name], float((diff / np.maximum(1.0, np.abs(e.numpy()))).max()))
    return ParityReport(worst, out_names, list(batch_sizes), max(per_output.values(), default=0.0), per_output)


class RandomInputs:
    """Fresh inputs in each column's valid range for the parity checks of both stages (never the export
    example, so a graph that baked in a shape or a constant fails)."""

    def __init__(self, seed: int):
        self.gen = np.random.default_rng(seed)

    def codes(self, sizes: list[int], b: int) -> torch.Tensor:
        """(b, len(sizes)) int64: column j uniform over its vocabulary [0, sizes[j])."""
        if not sizes:
            return torch.zeros((b, 0), dtype=torch.int64)
        return torch.from_numpy(np.stack([self.gen.integers(0, s, b) for s in sizes], axis=1).astype(np.int64))

    def history(self, vocab: int, length: int, b: int) -> torch.Tensor:
        """(b, length) int64 item ids with a random tail of padding (0), as real short histories have."""
        h = self.gen.integers(0, vocab, (b, length)).astype(np.int64)
        h[:, self.gen.integers(0, length + 1):] = 0
        return torch.from_numpy(h)

    def resampled(self, reference: np.ndarray, b: int, nan_share: float = 0.0) -> torch.Tensor:
        """(b, n) float32 rows drawn from ``reference`` (e.g. train values), a share of them NaN."""
        x = reference[self.gen.integers(0, len(reference), b)].astype(np.float32)
        x[self.gen.random(x.shape) < nan_share] = np.nan
        return torch.from_numpy(x)

    def gaussian(self, mean: np.ndarray, std: np.ndarray, b: int) -> torch.Tensor:
        """(b, n) float32 around ``mean`` with spread ``std`` per column."""
        return torch.from_numpy((mean + self.gen.standard_normal((b, len(mean))) * std).astype(np.float32))
