"""Where batches come from before any cache: datasets, input augmentation, raw sources.

The data layer turns a dataset (built in or the user's own) into training
batches on the device, in an order and with augmentation that are pure
functions of (seed, epoch, sample): ``datasets.py`` (the built-in sets, as
uint8 tensors), ``imagefolder.py`` (a torchvision ImageFolder tree),
``augment.py`` (padded crop and flip as batched gathers), ``sources.py`` (the
:class:`~prefast.data.sources.Batch` every feed yields, and the raw feeds over
tensors) and ``loader.py`` (the raw feed over any map-style dataset, through a
DataLoader).

Why a layer of its own: these change when a data format or an augmentation
changes, never when the caching policy does. The cache replays exactly what a
raw source would have produced (the same sample ids and augmentation streams),
so the caching layer above builds on this one and this one knows nothing of
caches. It imports only the store's device and order helpers and ``prefast.errors``.
"""
