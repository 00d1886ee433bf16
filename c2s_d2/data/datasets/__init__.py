"""Dataset registration (lazy: nothing here touches the disk until a dataset is loaded)."""

from . import builtin_benchmarks, register_miniworld  # noqa: F401
