"""Every private PyTorch API the optimizer engine relies on, in one place, each with the torch versions it was
checked on (2.11 and 2.13).  A torch upgrade that breaks one of them breaks it here."""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])

#: ``torch._disable_dynamo``: run a function eagerly even when called from compiled code, as torch.optim does for
#: ``state_dict``/``load_state_dict`` (2.11, 2.13).
disable_dynamo = torch._disable_dynamo


def mark_constant_result(fn: F) -> F:
    """What ``@torch._dynamo.assume_constant_result`` does (dynamo runs ``fn`` eagerly while tracing and keeps only
    its result), without importing dynamo with qop: the ``_dynamo_marked_constant`` attribute (2.11, 2.13)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def leave_to_lr_schedulers(fn: F) -> F:
    """Schedulers wrap ``opt.step`` in a tracking function that dynamo cannot trace unless it carries
    ``_wrapped_by_lr_sched`` (2.11, 2.13); the step then records ``_opt_called`` itself."""
    fn._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    return fn


def dynamo_loaded() -> bool:
    """Whether dynamo is imported (``torch.compiler.is_compiling()`` is False inside a constant-result function in
    2.11, so this is what tells :func:`mark_static` whether to run)."""
    return "torch._dynamo" in sys.modules


def mark_static(tensors: Iterable[Tensor]) -> None:
    """Mark the optimizer's tensors as static inputs, as dynamo does for ``torch.optim``'s: CUDA graphs
    (``mode="reduce-overhead"``) then use them in place, and a graph may mutate them, instead of skipping.
    ``torch._dynamo.mark_static_address`` and the ``_dynamo_static_input_type`` attribute (2.11, 2.13)."""
    from torch._dynamo import mark_static_address

    for t in tensors:
        if getattr(t, "_dynamo_static_input_type", None) is None:
            mark_static_address(t, guard=True)


# torch.optim.Optimizer keeps its state-dict hooks in ``_optimizer_{load_,}state_dict_{pre,post}_hooks`` and runs
# them inside its own ``state_dict``/``load_state_dict`` (2.11, 2.13).
def state_dict_hooks(opt: torch.optim.Optimizer, when: str) -> list[Callable[..., Any]]:
    """The hooks registered with ``register_state_dict_{when}_hook``."""
    return list(getattr(opt, f"_optimizer_state_dict_{when}_hooks").values())


def load_state_dict_hooks(opt: torch.optim.Optimizer, when: str) -> list[Callable[..., Any]]:
    """The hooks registered with ``register_load_state_dict_{when}_hook``."""
    return list(getattr(opt, f"_optimizer_load_state_dict_{when}_hooks").values())


@contextmanager
def without_state_dict_hooks(opt: torch.optim.Optimizer) -> Iterator[None]:
    """Call torch.optim's ``state_dict`` with no hooks (the engine runs them around its own work)."""
    names = ("_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks")
    saved = [getattr(opt, n) for n in names]
    for n in names:
        setattr(opt, n, OrderedDict())
    try:
        yield
    finally:
        for n, hooks in zip(names, saved):
            setattr(opt, n, hooks)
