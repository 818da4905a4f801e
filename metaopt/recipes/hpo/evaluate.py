"""Judging is task-specific here: each task's module holds its own (``l2``, ``schedule``, ``cleaning``, ``evidence``).

Every setting is judged by retraining on the task's data and measuring it on the held-out split:
:class:`.l2.L2Task` (``judge``: retrain to convergence; ``search``, ``curve``, ``compare``,
``greedy``: the baselines and the method comparison), :class:`.schedule.ScheduleTask` (``judge``
on fresh initialisations; ``grid`` of constant schedules), :class:`.cleaning.CleaningTask`
(``judge``, :func:`.cleaning.flag_scores`) and :class:`.evidence.EvidenceTask` (the closed-form
log evidence, ``identity``, ``direct`` L-BFGS, ``search``). Their figures are in :mod:`.plots`,
their markdown summaries in :mod:`.report`.
"""
