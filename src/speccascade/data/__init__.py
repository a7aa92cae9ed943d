"""Data shipped with the project: the Bible EN->ES verse pairs (``bible``)."""
