"""The training run: assemble it, loop over epochs, checkpoint, compare, plan.

``trainer.py`` is the one loop for all three modes (``baseline``, ``freezeout``,
``prefast``); it asks a feed for batches and knows nothing of caches.
``build.py`` turns names into the run's device, data, model, schedule and feed;
``checkpoint.py`` writes and reads checkpoints; ``compare.py`` runs several
modes side by side; ``plan.py`` measures once and predicts every mode (``prefast
plan``); ``progress.py`` draws the progress bars.

Why a layer of its own: this is where a run's life is decided (its epochs,
optimizer, checkpoints, ranks). It is the top of the library: the command line
(``prefast.cli``) and the public API (``prefast``) call it, and nothing below
imports it.
"""
