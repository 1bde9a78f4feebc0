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
        """Rebuilds the module around `params` (call inside jit; cheap: no arrays are copied).

        Strict: `params` must have exactly the template's keys and shapes (a (1,) bias would
        broadcast where (8,) is due and give wrong numbers silently). Under jit this check runs at
        trace time only. Dtypes may differ (bf16 params are a caller's choice)."""
        check_params(params, self.param_shapes())
        state = jax.tree.map(lambda x: x, self.template)  # fresh Variables, template stays intact
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v  # list indices may be ints or strings (nnx.List, restored trees)
    return out


def check_params(params: Params, shapes: Params) -> None:
    """ValueError naming the first few missing / unexpected / mis-shaped parameters, if any."""
    if not isinstance(params, dict):
        raise ValueError(f"params must be a nested dict of arrays, got {type(params).__name__}")
    got, want = _flat(params), _flat(shapes)
    name = lambda key: "/".join(map(str, key))  # noqa: E731
    problems = [f"missing {name(k)}" for k in want if k not in got]
    problems += [f"unexpected {name(k)}" for k in got if k not in want]
    problems += [f"{name(k)} has shape {tuple(jax.numpy.shape(got[k]))}, expected {tuple(s.shape)}"
                 for k, s in want.items() if k in got and tuple(jax.numpy.shape(got[k])) != tuple(s.shape)]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"params do not fit the module: {'; '.join(problems[:5])}{more}")


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
