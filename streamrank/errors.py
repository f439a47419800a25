"""Errors users see. Each carries a message that says what was wrong and what to do."""


class StreamRankError(Exception):
    """Base class for errors caused by input or setup rather than by a bug."""


class ConfigError(StreamRankError):
    """A pipeline definition names an unknown key, stage kind or value."""


class ModelNotFoundError(StreamRankError):
    """A model could not be found locally (and could not, or may not, be downloaded)."""


class DatasetNotFoundError(StreamRankError):
    """A dataset could not be found locally (and could not be downloaded)."""


class IndexMismatchError(StreamRankError):
    """An index on disk was built for another model, corpus or setting than the pipeline asks for."""


class IndexInconsistent(IndexMismatchError):
    """An index's files disagree with each other (read while another process rewrites them): reading
    again in a moment sees one whole generation. Raised by type, so readers can retry on it."""


class IndexMissingError(StreamRankError):
    """A stage needs an index that has not been built yet."""


class InvalidQueryError(StreamRankError):
    """A query is empty or otherwise unusable."""


class RankerError(StreamRankError):
    """A reranker could not produce a trustworthy ranking (constant scores, missing identifiers...)."""
