"""Size limits on request fields, as named constants (validated before any work is done)."""

MAX_NAME_LENGTH = 256
"""Longest resource or object name accepted, in characters."""

MAX_ASSOCIATED_DATA_LENGTH = 4096
"""Longest caller-supplied associated_data, in bytes."""

MAX_WRAPPED_KEY_LENGTH = 1024
"""Longest wrapped data key accepted; real ones are far shorter (see broker.data_keys)."""

MAX_BATCH_SIZE = 1000
"""Most items in one Batch*DataKeys request."""

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
