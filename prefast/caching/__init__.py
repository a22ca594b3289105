"""The caching policy: which frozen prefixes to cache, where, and moving them safely.

The prefast mode's feed (``materialize.py``, :class:`PrefastFeed`) yields the
same batches a raw source would, but from a boundary cache once a prefix is
frozen. Around it, each module owns one decision or one move:

- planning: ``probe.py`` times each stage on a real batch; ``costmodel.py``
  (pure arithmetic) plans the boundaries that pay for themselves;
  ``governor.py`` chooses each boundary's tier (gpu, ram, mmap, zarr) within
  the memory and disk budgets;
- moving: ``boundary.py`` (one boundary's state machine), ``transitions.py``
  (planned -> writing -> complete -> retired, and every fault's way back to
  raw data), ``spill.py`` (a cache to a lower tier under memory pressure),
  ``diskcharges.py`` (what disk caches really take and each writer may take),
  ``fits.py`` and ``overflow.py`` (stored values that overflow their dtype: never
  trained on, never kept), ``online.py`` (boundaries planned as ``--freeze auto``
  freezes), ``replay.py`` (a plan taken again, ``--plan-from``);
- serving: ``testcache.py`` (the test set at the current boundary),
  ``feature_augment.py`` (augmentation of cached activations);
- ``cachectx.py``: what these parts share (cache root, keys, the event log).

Why a layer of its own: this is the policy that changes when a tier, a cost or
a fault path does. It builds on the store (bytes on a tier), the data layer
(raw batches to materialize) and the freeze schedule, and is driven by the
training layer above it, which it never imports.
"""
