"""The generic converter: torch layout <-> Flax layout, strict on missing / unexpected / mis-shaped."""
import numpy as np
import pytest
import torch
from flax import nnx

from jedi_jax.convert.torch_naming import ConversionError, params_to_torch, torch_to_params
from jedi_jax.models.functional import Functional


class TinyFlax(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 5, (3, 3), padding=1, rngs=rngs)
        self.norm = nnx.GroupNorm(5, num_groups=1, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(5, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])
        self.embed = nnx.Embed(7, 5, rngs=rngs)


class TinyTorch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.norm = torch.nn.GroupNorm(1, 5)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(5, 4), torch.nn.Linear(4, 2)])
        self.embed = torch.nn.Embedding(7, 5)


def _tensors():
    torch.manual_seed(0)
    return {k: v.detach().numpy() for k, v in TinyTorch().state_dict().items()}


def test_round_trip_and_forward_equal():
    tensors = _tensors()
    fm = Functional.abstract(lambda r: TinyFlax(r))
    params = torch_to_params(tensors, fm.param_shapes(), what="tiny")
    back = params_to_torch(params)
    assert back.keys() == tensors.keys()
    for k in tensors:
        np.testing.assert_array_equal(back[k], tensors[k])
    # The conv really is the same function after conversion (layout, not just shapes).
    x = np.random.default_rng(0).normal(size=(1, 3, 6, 6)).astype(np.float32)
    ref = TinyTorch()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    y_torch = ref.conv(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
    y_flax = np.asarray(fm.bind(params).conv(x.transpose(0, 2, 3, 1)))
    assert np.abs(y_torch - y_flax).max() < 1e-5


def test_strict_errors_name_the_tensor():
    fm = Functional.abstract(lambda r: TinyFlax(r))
    tensors = _tensors()
    missing = dict(tensors)
    del missing["blocks.1.weight"]
    with pytest.raises(ConversionError, match=r"missing tensor 'blocks\.1\.weight'"):
        torch_to_params(missing, fm.param_shapes(), what="tiny")
    extra = dict(tensors, **{"blocks.2.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected tensor 'blocks\.2\.weight'"):
        torch_to_params(extra, fm.param_shapes(), what="tiny")
    wrong = dict(tensors, **{"conv.weight": np.zeros((5, 3, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match=r"'conv\.weight' has shape"):
        torch_to_params(wrong, fm.param_shapes(), what="tiny")
