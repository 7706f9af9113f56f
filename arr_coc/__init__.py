"""ARR-COC: a query-aware visual token allocator in front of a frozen Qwen-VL model."""

__version__ = "0.1.0"
