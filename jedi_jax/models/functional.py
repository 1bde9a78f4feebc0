"""Functional (tree-mode) use of NNX modules: params are plain nested dicts, modules are rebuilt inside jit.

    fm = Functional.create(lambda rngs: UNet(cfg, rngs=rngs), seed=0)   # real init
    fm = Functional.abstract(lambda rngs: UNet(cfg, rngs=rngs))         # shapes only, no memory
    out = jax.jit(lambda p, x: fm.bind(p)(x))(params, x)                # params are a jit argument

The graphdef and the abstract state template hold no arrays, so a `Functional` can be closed over
by jitted functions without baking weights into the program.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
from flax import nnx

Params = dict  # nested dict of arrays, as `nnx.State.to_pure_dict()` returns


@dataclasses.dataclass(frozen=True)
class Functional:
    graphdef: Any
    template: Any  # nnx.State with ShapeDtypeStruct leaves

    @classmethod
    def abstract(cls, factory: Callable[[nnx.Rngs], nnx.Module]) -> "Functional":
        module = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
        graphdef, state = nnx.split(module)
        return cls(graphdef, state)

    @classmethod
    def create(cls, factory: Callable[[nnx.Rngs], nnx.Module], seed: int = 0) -> tuple["Functional", Params]:
        """Initializes real parameters (on the default device) and returns (functional, params)."""
        module = factory(nnx.Rngs(seed))
        graphdef, state = nnx.split(module)
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        return cls(graphdef, template), state.to_pure_dict()

    def param_shapes(self) -> Params:
        """Nested dict of ShapeDtypeStruct, same structure as params."""
        return self.template.to_pure_dict()

    def bind(self, params: Params) -> nnx.Module:
        """Rebuilds the module around `params` (call inside jit; cheap: no arrays are copied).

        Strict: `params` must have exactly the template's keys and shapes (a (1,) bias would
        broadcast where (8,) is due and give wrong numbers silently). Under jit this check runs at
        trace time only. Dtypes may differ (bf16 params are a caller's choice)."""
        check_params(params, self.param_shapes())
        state = jax.tree.map(lambda x: x, self.template)  # fresh Variables, template stays intact
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def flat_shapes(tree: Params) -> dict[str, tuple]:
    """{'down_blocks.0.resnets.1.conv1.kernel': shape} of a nested params (or ShapeDtypeStruct) dict;
    list indices, ints in nnx trees and strings in restored ones, read the same."""
    from jedi_jax.convert.torch_naming import flatten

    def shape(leaf) -> tuple:  # arrays, tracers, ShapeDtypeStructs, orbax metadata: all have .shape
        return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(jax.numpy.shape(leaf))

    return {".".join(map(str, path)): shape(leaf) for path, leaf in flatten(tree).items()}


def shape_problems(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> list[str]:
    """One line per missing, unexpected or mis-shaped parameter between two {name: shape} maps."""
    problems = [f"missing parameter {k!r} (expected shape {s})" for k, s in expected.items() if k not in got]
    problems += [f"unexpected parameter {k!r} (shape {s})" for k, s in got.items() if k not in expected]
    problems += [f"parameter {k!r} has shape {got[k]} but the model needs {s}"
                 for k, s in expected.items() if k in got and got[k] != s]
    return problems


def check_params(params: Params, shapes: Params) -> None:
    """ValueError naming the first few missing / unexpected / mis-shaped parameters, if any."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a nested dict of arrays, got {type(params).__name__}")
    problems = shape_problems(flat_shapes(shapes), flat_shapes(params))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"params do not fit the module: {'; '.join(problems[:5])}{more}")


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
