"""The one parity rule both training stages ship under: a graph that disagrees with its eager module raises."""

import pytest
import torch

from training.onnx_export import check_parity, export_onnx


def _inputs(b: int) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(b, 4, generator=torch.Generator().manual_seed(b))}


def test_parity_passes_for_the_exported_module_and_fails_for_another(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sigmoid())
    path = export_onnx(model, _inputs(2), tmp_path / "m.onnx", ["y"])
    report = check_parity(model, path, _inputs).require("model", 1e-5)
    assert report.max_scaled_diff <= 1e-5 and report.batch_sizes == [1, 7, 64]

    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sigmoid())  # different weights, same graph shape
    with pytest.raises(RuntimeError, match="ONNX parity of the item tower failed: max scaled diff"):
        check_parity(other, path, _inputs).require("item tower", 1e-5)
