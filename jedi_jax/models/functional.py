"""Functional (tree-mode) use of NNX modules: params are plain nested dicts, modules are rebuilt inside jit.

    fm = Functional.create(lambda rngs: UNet(cfg, rngs=rngs), seed=0)   # real init
    fm = Functional.abstract(lambda rngs: UNet(cfg, rngs=rngs))         # shapes only, no memory
    out = jax.jit(lambda p, x: fm.bind(p)(x))(params, x)                # params are a jit argument

The graphdef and the abstract state template hold no arrays, so a `Functional` can be closed over
by jitted functions without baking weights into the program.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

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
        """Rebuilds the module around `params` (call inside jit; cheap: no arrays are copied)."""
        state = jax.tree.map(lambda x: x, self.template)  # fresh Variables, template stays intact
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
