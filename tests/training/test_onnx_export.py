"""The one parity rule both training stages ship under: a graph that disagrees with its eager module raises."""

import numpy as np
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


def test_random_inputs_stay_in_range() -> None:
    from training.onnx_export import RandomInputs

    rnd = RandomInputs(0)
    codes = rnd.codes([3, 50, 1], 200)
    assert codes.shape == (200, 3) and (codes.min(0).values >= 0).all()
    assert (codes.max(0).values < torch.tensor([3, 50, 1])).all()
    h = rnd.history(10, 6, 300)
    assert h.shape == (300, 6) and int(h.max()) < 10
    zero_cols = (h == 0).all(0).nonzero().flatten().tolist()  # the padded tail: whole columns of 0
    assert zero_cols == list(range(6 - len(zero_cols), 6))
    ref = np.arange(12, dtype=np.float64).reshape(4, 3)
    x = rnd.resampled(ref, 500, nan_share=0.1)
    assert x.dtype == torch.float32 and 0.05 < torch.isnan(x).float().mean() < 0.15
    ok = x[~torch.isnan(x).any(1)]
    assert set(map(tuple, ok.numpy().tolist())) <= set(map(tuple, ref.astype(np.float32).tolist()))
    assert rnd.codes([], 4).shape == (4, 0)
