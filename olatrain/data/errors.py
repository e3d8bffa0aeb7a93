"""The data pipeline's one error type."""


class DataError(ValueError):
    """Bad training data or an unusable store/dataset combination; the message says what to do."""
