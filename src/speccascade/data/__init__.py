"""Data shipped with the project: the Bible EN->ES verse pairs (``bible``) and the prompt format of the
shipped translation models (``prompt``)."""
