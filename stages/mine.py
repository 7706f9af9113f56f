"""Hard-example mining: the stage-2 model scores a pool and the hardest part is sharded.

No optimizer steps: ``MineTask.trains`` is False, so the runner builds the model,
calls ``evaluate`` (which scores the pool) and ``export`` (which writes the results),
with no engine, loop or checkpoints; a re-run simply scores again.

The pool is the training split of the VQAv2 shards (its first ``pool_samples`` questions
when that is set, so mining time stays bounded on a large split). For every question the model's
answer-token cross-entropy at budget K (``per_sample_loss``) and the VQA soft accuracy
of its greedy answer at budget K are recorded. The hard set is the ``hard_fraction``
with the highest loss of each group of questions with the same answer (``hard_strata:
answer``; the whole pool with ``none``) plus every question the data flags as a hard case
(small objects, low contrast, same-colour distractors). Per answer, because the highest
losses overall skew the answers (measured: 53 "yes" and 9 "no" where the pool had 219 and
200) and training on them shifts the model's answer priors. Artifact:

* ``hard/``: the whole scored pool as a ``datasets`` table (``save_to_disk``), with
  ``selected`` / ``by_loss`` / ``flagged`` columns saying why a row is in the hard set;
* ``shards/``: the hard set as VQAv2 shards (data_prep's writer, shard contract),
  ``train-*.tar`` + ``manifest.json``;
* ``allocator.safetensors`` + ``adapter/``: the stage-2 weights it scored with, so
  stage 3 starts from this artifact alone; ``lineage.json``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch

from stages import common
from stages.data import iter_samples
from stages.evaluate import generate_answers, vqa_soft_accuracy
from stages.stage2 import VQATask

HARD_TABLE_DIR = "hard"
HARD_SHARDS_DIR = "shards"
# The hard set is cut into at least this many shards (when it has the samples), so the
# stage-3 loader can split it over up to this many ranks x workers.
MIN_HARD_SHARDS = 8


def stratum_quotas(sizes: list[int], fraction: float) -> list[int]:
    """``fraction`` of each stratum, rounded by largest remainder so they sum to ``ceil(fraction * n)``.

    Ties of the remainder go to the earlier stratum, so the quotas are deterministic.
    """
    exact = [fraction * size for size in sizes]
    quotas = [math.floor(x) for x in exact]
    spare = math.ceil(fraction * sum(sizes)) - sum(quotas)
    order = sorted(range(len(sizes)), key=lambda i: -(exact[i] - quotas[i]))
    for i in order[:spare]:
        quotas[i] += 1
    return quotas


def select_hard(
    losses: list[float], flagged: list[bool], fraction: float, strata: list[str] | None = None
) -> tuple[list[bool], list[bool]]:
    """(by_loss, selected): the top ``fraction`` of losses within each stratum, and those OR flagged.

    ``strata`` (one key per row, e.g. the question's answer) splits the pool; each stratum
    gives its own share of top losses, so the hard set keeps the pool's mix of strata.
    ``None``: the pool is one stratum (the top ``ceil(fraction * n)`` losses overall).
    Ties are broken by pool order (a stable sort), so the selection is deterministic.
    """
    keys = strata if strata is not None else [""] * len(losses)
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    groups = list(members.values())
    top: set[int] = set()
    for rows, quota in zip(groups, stratum_quotas([len(g) for g in groups], fraction)):
        top.update(sorted(rows, key=lambda i: -losses[i])[:quota])
    by_loss = [i in top for i in range(len(losses))]
    return by_loss, [b or f for b, f in zip(by_loss, flagged)]


class MineTask(VQATask):
    trains = False

    def __init__(self, ctx):
        super().__init__(ctx)
        self.rows: dict[str, list[Any]] | None = None

    def train_loader(self):
        raise RuntimeError("mine: no training loop (MineTask.trains is False)")

    def training_step(self, model, batch):
        raise RuntimeError("mine: no training loop (MineTask.trains is False)")

    @torch.no_grad()
    def score_chunk(self, model, chunk: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        """Per-sample answer loss and soft accuracy at budget K."""
        out, _ = self.answer_loss(model, chunk)
        answers = generate_answers(
            model,
            self.processor,
            chunk,
            self.budget,
            len(chunk),
            self.ctx.cfg.model.max_answer_tokens,
            self.ctx.device,
        )
        accuracy = [vqa_soft_accuracy(a, s["json"]["answers"]) for a, s in zip(answers, chunk)]
        return out.per_sample_loss.float().cpu().tolist(), accuracy

    def score_pool(self, model) -> dict[str, list[Any]]:
        module = common.unwrap(model)
        module.eval()
        rows: dict[str, list[Any]] = {
            name: []
            for name in (
                "key",
                "question_id",
                "image_id",
                "question",
                "answer",
                "answers",
                "flags",
                "loss",
                "accuracy",
                "image",
            )
        }
        chunk: list[dict[str, Any]] = []
        pool = iter_samples(self.paths.vqav2, "train")
        if self.ctx.stage.pool_samples:
            pool = itertools.islice(pool, self.ctx.stage.pool_samples)
        for sample in itertools.chain(pool, [None]):  # None flushes
            if sample is not None:
                chunk.append(sample)
            if chunk and (sample is None or len(chunk) == self.ctx.stage.batch_size):
                losses, accuracy = self.score_chunk(module, chunk)
                for item, loss, acc in zip(chunk, losses, accuracy):
                    meta = item["json"]
                    rows["key"].append(item["__key__"])
                    rows["question_id"].append(int(meta["question_id"]))
                    rows["image_id"].append(int(meta["image_id"]))
                    rows["question"].append(meta["question"])
                    rows["answer"].append(meta["answer"])
                    rows["answers"].append(list(meta["answers"]))
                    rows["flags"].append(list(meta.get("hard", [])))
                    rows["loss"].append(float(loss))
                    rows["accuracy"].append(float(acc))
                    rows["image"].append(item["image_bytes"])
                chunk = []
        flagged = [bool(f) for f in rows["flags"]]
        strata = rows["answer"] if self.ctx.stage.hard_strata == "answer" else None
        rows["by_loss"], rows["selected"] = select_hard(rows["loss"], flagged, self.ctx.stage.hard_fraction, strata)
        rows["flagged"] = flagged
        return rows

    def evaluate(self, model) -> dict[str, float]:
        self.rows = self.score_pool(model)
        rows = self.rows
        selected = [i for i, s in enumerate(rows["selected"]) if s]
        by_loss = [rows["loss"][i] for i, b in enumerate(rows["by_loss"]) if b]
        return {
            "pool_size": float(len(rows["key"])),
            "pool_loss": sum(rows["loss"]) / len(rows["loss"]),
            "pool_accuracy": sum(rows["accuracy"]) / len(rows["accuracy"]),
            "hard_selected": float(len(selected)),
            "hard_by_loss": float(sum(rows["by_loss"])),
            "hard_flagged": float(sum(rows["flagged"])),
            "hard_loss_threshold": min(by_loss) if by_loss else math.nan,
            "hard_accuracy": sum(rows["accuracy"][i] for i in selected) / max(1, len(selected)),
            "budget": float(self.budget),
        }

    def export(self, model, artifact_dir: Path) -> None:
        super().export(model, artifact_dir)  # the stage-2 weights, heatmaps, lineage
        if not common.is_writer(self.ctx):
            return
        import datasets

        from data_prep.shard import shard_hf_dataset

        if self.rows is None:
            self.rows = self.score_pool(model)
        table = datasets.Dataset.from_dict(self.rows)
        table.save_to_disk(str(artifact_dir / HARD_TABLE_DIR))
        hard = table.filter(lambda row: row["selected"])
        shard_size = max(1, min(self.ctx.cfg.data.shard_size, math.ceil(len(hard) / MIN_HARD_SHARDS)))
        shard_hf_dataset(
            hard,
            artifact_dir / HARD_SHARDS_DIR,
            split="train",
            image_column="image",
            question_column="question",
            answers_column="answers",
            shard_size=shard_size,
            workers=1,
            progress=False,
        )
