"""The jobs behind the CLI commands: one module per command, each with a frozen config and one public
``run_*`` function returning a plain result dict (what ``--json`` prints). Nothing here prints; long
work reports through ``progress(description, done, total[, info])``.

- ``common``: model options, the workspace's model and failures, the seeded split, bundled sets;
- ``locate``, ``apply``, ``report``, ``export``, ``sensitive``: the commands;
- ``experiment``: what apply and report share (every image set cached at the first edited block,
  the preserve set, one edit measured on them).

locate -> apply -> report -> export share a workspace (``vitedit.workspace``); apply and report use
the same seeded split of the failures into *edit* images (used to choose and fit the edit) and
*held-out* images (used only to measure generalization).

Memory is bounded whatever the number of images: every image set is read in batches
(``data.ImageBatches``); the workspace records the failing images by path and sha256, not as
tensors; apply and report load only the edit images (few) at once and stream the held-out, check
and locality sets through ``evaluate.TokenCache``, which keeps their prefix tokens only under a
budget. The preserve set's tokens stay in memory (a minibatch is drawn every step), cut to the budget.
"""
