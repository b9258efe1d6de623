"""The surgery rewrites by name: each registers itself here, and simplify runs them in order.

A rewrite is a function ``apply(surgeon) -> bool`` (True when it changed the graph) in a module of
:mod:`egp_onnx.surgery.rewrites`, decorated with :func:`register_rewrite` (importing
:mod:`egp_onnx.surgery` imports them all). Its name is the ``kind`` of the records it writes to
the report, so the name is spelled once, at registration.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from egp_onnx.errors import ConfigError

if TYPE_CHECKING:
    from egp_onnx.surgery.surgeon import Surgeon

#: What makes a rewrite safe: exact algebra, or the calibration statistics (exact on that data).
Licence = Literal["algebra", "statistics"]
LICENCES: tuple[Licence, ...] = ("algebra", "statistics")

Apply = Callable[["Surgeon"], bool]


@dataclass(frozen=True)
class RewriteSpec:
    """One registered rewrite."""

    name: str  # the Rewrite.kind written to the report
    order: int  # position in each round of simplify's fixed point (lower runs first)
    licence: Licence
    apply: Apply
    # further Rewrite kinds it writes, each a step of this rewrite that cannot run on its own
    steps: tuple[str, ...] = ()

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every Rewrite.kind this rewrite writes, in the order it can write them: steps first."""
        return (*self.steps, self.name)


REWRITES: dict[str, RewriteSpec] = {}


def register_rewrite(
    name: str, *, order: int, licence: Licence, steps: tuple[str, ...] = ()
) -> Callable[[Apply], Apply]:
    """Register the decorated function as the rewrite ``name``; the function is returned as it is.

    Raises:
        ValueError: a name, step or order registered twice, or an unknown licence.

    """

    def register(apply: Apply) -> Apply:
        spec = RewriteSpec(name, order, licence, apply, steps)
        taken = {kind for other in REWRITES.values() for kind in other.kinds}
        if taken & set(spec.kinds):
            raise ValueError(f"rewrite kind registered twice: {sorted(taken & set(spec.kinds))}")
        if any(other.order == order for other in REWRITES.values()):
            raise ValueError(f"rewrite {name}: order {order} is taken")
        if licence not in LICENCES:
            raise ValueError(f"rewrite {name}: licence {licence!r} is not one of {', '.join(LICENCES)}")
        REWRITES[name] = spec
        return apply

    return register


def rewrites(skip: Collection[str] = ()) -> list[RewriteSpec]:
    """The registered rewrites sorted by order, without those named in ``skip``.

    Raises:
        ConfigError: ``skip`` names a rewrite that is not registered.

    """
    unknown = sorted(set(skip) - set(REWRITES))
    if unknown:
        parts = {step: spec.name for spec in REWRITES.values() for step in spec.steps}
        why = "".join(f" ({name} is a step of {parts[name]})" for name in unknown if name in parts)
        valid = ", ".join(spec.name for spec in _sorted())
        raise ConfigError(f"cannot skip rewrite {', '.join(unknown)}{why}: the rewrites are {valid}")
    return [spec for spec in _sorted() if spec.name not in skip]


def _sorted() -> list[RewriteSpec]:
    return sorted(REWRITES.values(), key=lambda spec: spec.order)
