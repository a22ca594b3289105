"""The ``prefast`` command line: parse, call the library, print.

``main.py`` is the console script (signals, exit codes); one module per
command: ``train.py`` (train, compare), ``plan.py``, ``cache.py`` (ls,
inspect, verify, purge), ``bench.py``; ``common.py`` holds the options
``train``, ``compare`` and ``plan`` share. The top layer: nothing imports it. It lives in
the top-level ``cli/`` folder, imported as ``prefast.cli`` (``setup.cfg``'s ``package_dir``).
"""
