"""Dataset registration (lazy: nothing here touches the disk until a dataset is loaded)."""

from . import builtin_benchmarks, register_miniworld  # noqa: F401
from . import transfer  # noqa: F401  (after builtin_benchmarks: reads its class files)
from . import custom  # noqa: F401  (registers $C2S_CUSTOM_DATASETS, see custom.py)
