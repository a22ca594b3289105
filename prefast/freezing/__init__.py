"""When each stage stops training: the freeze schedule.

``schedule.py`` holds FreezeOut's schedule (stage ``i`` freezes at a fixed
fraction ``t_i`` of the iterations, its learning rate annealed to zero by then)
and the schedule of a resumed run with another epoch count. The training loop
asks it which stages train at an iteration and at what rate; the caching
policy asks it when each stage freezes, to plan its boundaries.

Why a layer of its own: the freeze rule is the one thing the caching policy
and the training loop both follow, and it changes for its own reasons (a new
rule, such as freezing a stage when its gradients stop changing, lands here).
It imports nothing of PreFast but ``prefast.errors``.
"""
