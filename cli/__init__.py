"""The ``prefast`` command line (installed as ``prefast.cli``)."""
