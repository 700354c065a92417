"""Task-homogeneous, deterministic, resumable batches of training examples.

Every batch comes from one task (in-batch negatives of another task would be easy, or false, negatives).
An epoch's batch order is a pure function of ``(seed, epoch)``: per task, shuffle the record ids and cut
them into full batches; a task's weight in ``task_weights`` scales how many of its batches an epoch holds
(>1 repeats batches, <1 drops some, rounded, but a task of weight > 0 keeps at least one); then all batches are
shuffled together. The position ``(epoch, step)`` is the whole state, so resuming replays nothing and skips nothing.
"""
from __future__ import annotations

import random
from typing import Optional

from ..prompts import format_query


class TaskBatchSampler:
    """Yields ``(task, [record ids], epoch)`` batches of ``batch_size`` records from one task each.

    ``tasks``: ``{task: [record ids]}``; tasks with fewer than ``batch_size`` records are skipped, and each epoch
    leaves out the last ``len % batch_size`` records of every task (a different draw each epoch): ``coverage()``
    says how many, and the trainer logs it. ``task_weights``: optional ``{task: weight >= 0}``; missing tasks weigh 1.
    """

    def __init__(self, tasks: dict, batch_size: int, *, seed: int = 0, task_weights: Optional[dict] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        weights = dict(task_weights or {})
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ValueError(f"task_weights names tasks not in the data: {unknown}; tasks are {sorted(tasks)}")
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"task_weights must be >= 0, got {weights}")
        self.tasks = {t: list(ids) for t, ids in sorted(tasks.items())}
        self.batch_size = batch_size
        self.seed = seed
        self.weights = {t: float(weights.get(t, 1.0)) for t in self.tasks}
        self.epoch = 0
        self.step = 0  # batches of the current epoch already handed out
        if self.batches_per_epoch() == 0:
            sizes = {t: len(ids) for t, ids in self.tasks.items()}
            if max(sizes.values(), default=0) < batch_size:
                raise ValueError(f"no task has batch_size={batch_size} records (records per task: {sizes})")
            raise ValueError(f"task_weights {weights} leave no batch in an epoch (they weigh 0 every task with a full "
                             f"batch; records per task: {sizes}, batch_size {batch_size}): give a task with enough "
                             "records a weight > 0")

    def _epoch_batches(self, epoch: int) -> list:
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for task, ids in self.tasks.items():
            ids = list(ids)
            rng.shuffle(ids)
            full = [ids[i:i + self.batch_size] for i in range(0, len(ids) - self.batch_size + 1, self.batch_size)]
            if not full:
                continue
            weight = self.weights[task]
            want = max(1, round(len(full) * weight)) if weight > 0 else 0  # a weighted task is never dropped
            chosen = [full[i % len(full)] for i in range(want)]
            batches.extend((task, b) for b in chosen)
        rng.shuffle(batches)
        return batches

    def coverage(self) -> dict:
        """What one epoch leaves out: the tasks smaller than a batch (never trained on) and, per task, the records
        that do not fill a last batch (others are left out in the next epoch)."""
        size = self.batch_size
        return dict(tasks_smaller_than_a_batch={t: len(ids) for t, ids in self.tasks.items() if len(ids) < size},
                    left_out_per_epoch={t: len(ids) % size for t, ids in self.tasks.items()
                                        if len(ids) >= size and len(ids) % size})

    def batches_per_epoch(self) -> int:
        return len(self._epoch_batches(0))

    def __iter__(self):
        """Endless iteration from the current position; the position advances as batches are taken."""
        while True:
            batches = self._epoch_batches(self.epoch)
            while self.step < len(batches):
                task, ids = batches[self.step]
                self.step += 1
                yield task, ids, self.epoch
            self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, step=self.step, seed=self.seed, batch_size=self.batch_size)

    def load_state_dict(self, state: dict):
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ValueError(f"sampler state was saved with seed={state['seed']}, batch_size={state['batch_size']}; "
                             f"this run has seed={self.seed}, batch_size={self.batch_size}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def build_example(record: dict, rid: int, *, num_negatives: int, seed: int, epoch: int) -> tuple:
    """``(query text, [positive, negative_1..M], teacher scores)`` for one record; the choice is seeded by
    (seed, epoch, rid).

    One positive is drawn from ``pos``; M negatives from ``neg`` (without replacement when it has enough,
    with replacement otherwise). The teacher scores are the record's ``pos_scores`` / ``neg_scores`` of the chosen
    texts (``1 + M`` floats), or None when the record has none for them.
    """
    rng = random.Random(f"{seed}:{epoch}:{rid}")
    pos = rng.randrange(len(record["pos"]))
    negs = record["neg"]
    if num_negatives == 0:
        chosen = []
    elif not negs:
        raise ValueError(f"record {rid} ({record['query'][:40]!r}) has no hard negatives but {num_negatives} "
                         "are asked for")
    elif len(negs) >= num_negatives:
        chosen = rng.sample(range(len(negs)), num_negatives)
    else:
        chosen = [rng.randrange(len(negs)) for _ in range(num_negatives)]
    pos_scores, neg_scores = record.get("pos_scores"), record.get("neg_scores")
    scores = None
    if pos_scores is not None and (neg_scores is not None or not chosen):
        scores = [float(pos_scores[pos])] + [float(neg_scores[i]) for i in chosen]
    return (format_query(record["query"], record["instruction"]), [record["pos"][pos]] + [negs[i] for i in chosen],
            scores)
