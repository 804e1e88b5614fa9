"""qop optimizers: the bitsandbytes family and torchao's 4-bit/fp8 Adam, on one engine (:class:`QopOptimizer`)."""

from .adagrad import Adagrad, Adagrad8bit, Adagrad32bit
from .adam import (
    Adam,
    Adam4bit,
    Adam8bit,
    Adam32bit,
    AdamFp8,
    AdamW,
    AdamW4bit,
    AdamW8bit,
    AdamW32bit,
    AdamWFp8,
    PagedAdam,
    PagedAdam8bit,
    PagedAdam32bit,
    PagedAdamW,
    PagedAdamW8bit,
    PagedAdamW32bit,
)
from .ademamix import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit, PagedAdEMAMix, PagedAdEMAMix8bit, PagedAdEMAMix32bit
from .lamb import LAMB, LAMB8bit, LAMB32bit
from .lion import Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit
from .manager import GlobalOptimManager
from .optimizer import QopOptimizer
from .rmsprop import RMSprop, RMSprop8bit, RMSprop32bit
from .sgd import LARS, SGD, LARS8bit, LARS32bit, SGD8bit, SGD32bit

__all__ = [
    "LAMB",
    "LARS",
    "SGD",
    "AdEMAMix",
    "AdEMAMix8bit",
    "AdEMAMix32bit",
    "Adagrad",
    "Adagrad8bit",
    "Adagrad32bit",
    "Adam",
    "Adam4bit",
    "Adam8bit",
    "Adam32bit",
    "AdamFp8",
    "AdamW",
    "AdamW4bit",
    "AdamW8bit",
    "AdamW32bit",
    "AdamWFp8",
    "GlobalOptimManager",
    "LAMB8bit",
    "LAMB32bit",
    "LARS8bit",
    "LARS32bit",
    "Lion",
    "Lion8bit",
    "Lion32bit",
    "PagedAdEMAMix",
    "PagedAdEMAMix8bit",
    "PagedAdEMAMix32bit",
    "PagedAdam",
    "PagedAdam8bit",
    "PagedAdam32bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "PagedLion",
    "PagedLion8bit",
    "PagedLion32bit",
    "QopOptimizer",
    "RMSprop",
    "RMSprop8bit",
    "RMSprop32bit",
    "SGD8bit",
    "SGD32bit",
]

#: Every optimizer class exported here, by name: what the tests, the benchmarks and the docs iterate over.
CLASSES: tuple[type[QopOptimizer], ...] = tuple(
    sorted(
        (
            c
            for c in map(globals().get, __all__)
            if isinstance(c, type) and issubclass(c, QopOptimizer) and c is not QopOptimizer
        ),
        key=lambda c: c.__name__,
    )
)
