"""Learning from production feedback, between policy steps: the feedback stream (Redis consumer
group) -> preference pairs and rated points -> a fit of the reward model (Bradley–Terry on the pairs
plus a pointwise loss on the ratings, warm-started from the current reward model) -> held-out check
-> checkpoint -> XACK -> push to the reward replicas. Optionally SFT of the policy on corrections
(TRL's SFTTrainer), and the ratings as direct rewards of the policy (``offpolicy.py``, driven by the
learner after each step; the ids it used are checkpointed here so no rating is used twice).

Data, per event kind (``FeedbackRecord`` views):
  comparison   chosen > rejected
  correction   corrected text > the logged original (and an SFT example when sft_on_corrections)
  rating       ratings of the same prompt in one window: best > worst (``best_and_worst_of_n``,
               the score difference as the Bradley–Terry margin); a lone rating gives no pair
  inline_pair  like a rating when it carries one
Every rating is also a *point* (``records_to_points``): its score in [0, 1] (thumb up 1, down 0, a
scalar normalised by its declared range) is the target of BCE(sigmoid(r(x, y))), weighted by
``rm_pointwise_weight`` and added to the Bradley–Terry loss -log sigmoid(r_chosen - r_rejected -
margin). So a lone rating is a signal too, and the reward model's 0 means "neutral".
Pairs and points longer than ``rm_max_length`` tokens are dropped (``filter_long``). The newest
``rm_holdout_fraction`` of a window's pairs and points is held out, and no event is on both sides
(``split_window``). The new model is pushed only if its held-out pairwise accuracy is not below the
current model's; a window with held-out points but no held-out pairs is gated on pointwise accuracy
(sign agreement of r with rating - 0.5) instead; both are reported. A temporal split: production data
drifts, so the newest feedback is the honest test.

Exactly once. Events are read through the consumer group and stay *pending* while they are
buffered and fitted. A fit is committed (new reward model + its data window, the list of event
ids) under the learner's lock, the learner writes a checkpoint that holds both, and only then are
the ids XACKed. A crash before the checkpoint leaves them pending: the restarted learner re-reads
its pending entries (XREADGROUP id 0, plus XAUTOCLAIM of other consumers' stale ones) and trains on
them again, into a model that never saw them. A crash after the checkpoint but before the XACK
leaves ids pending that the checkpoint's windows already list: they are acked and skipped.

Reward-model versions only go up: a push uses max(our version, every replica's GetModel) + 1, and
a replica that serves something else than our version (restarted, or pushed by a killed run) gets
our weights again, like the policy publisher does for generators.

Encoding must match the reward service (``flywheel.reward.model_scorer.RewardModel._encode``):
the chat template over (user: prompt, assistant: completion) when the tokenizer has one, else the
tokenizer's text pair; left truncation; no EOS appended. So rows are tokenized here (``encode``).
The fit is a small torch loop rather than TRL's RewardTrainer: its collator only knows pairs, and a
window of mixed pairs and points (or points alone) needs both losses in one step.
"""

from __future__ import annotations

import copy
import logging
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flywheel.common import keys
from flywheel.feedback.consumer import FeedbackConsumer
from flywheel.feedback.records import FeedbackRecord
from flywheel.learner.config import LearnerConfig
from flywheel.learner.metrics import LearnerMetrics
from flywheel.training.data import best_and_worst_of_n, filter_long

log = logging.getLogger(__name__)

CONSUMER_NAME = "learner"  # one learner workload: a stable name finds its own pending entries again
KEEP_WINDOWS = 64  # data windows kept in the checkpoint (enough to recognise un-acked ids)


# --- data: records -> preference pairs -------------------------------------------------------
def records_to_pairs(records: Sequence[FeedbackRecord]) -> list[dict[str, Any]]:
    """Preference pairs ({prompt, chosen, rejected, margin, event_ids}) in stream order."""
    pairs: list[dict[str, Any]] = []
    rated: list[dict[str, Any]] = []
    for record in records:
        pair = record.preference_pair()
        if pair is not None:
            pairs.append({**pair, "margin": 0.0, "event_ids": [record.event_id]})
        elif record.rating is not None and record.completion is not None:
            rated.append({"prompt": record.prompt, "completion": record.completion.text,
                          "score": record.rating.score, "event_id": record.event_id})
    for pair in best_and_worst_of_n(rated):
        ids = [r["event_id"] for r in rated if r["prompt"] == pair["prompt"]
               and r["completion"] in (pair["chosen"], pair["rejected"])]
        pairs.append({**pair, "event_ids": ids})
    order = {r.event_id: i for i, r in enumerate(records)}
    return sorted(pairs, key=lambda p: max(order.get(e, 0) for e in p["event_ids"]))


def records_to_points(records: Sequence[FeedbackRecord]) -> list[dict[str, Any]]:
    """Rated completions as pointwise targets ({prompt, completion, target in [0, 1], event_ids})."""
    return [{"prompt": r.prompt, "completion": r.completion.text, "target": r.rating.score, "event_ids": [r.event_id]}
            for r in records if r.rating is not None and r.completion is not None]


def split_window(records: Sequence[FeedbackRecord], pairs: Sequence[dict[str, Any]], points: Sequence[dict[str, Any]],
                 fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]],
                                           list[dict[str, Any]]]:
    """(train pairs, train points, held-out pairs, held-out points): the newest ``fraction`` of pairs and
    points together held out (``split_newest``, stream order of their newest event; at equal order a point
    sorts before the pair it is part of, so holding the point out holds the pair out too). Training items
    that share an event with a held-out item are dropped: no event is on both sides of the split."""
    order = {r.event_id: i for i, r in enumerate(records)}
    items = sorted([*points, *pairs], key=lambda it: (max(order.get(e, 0) for e in it["event_ids"]), "target" not in it))
    train, held = split_newest(items, fraction)
    held_ids = {e for it in held for e in it["event_ids"]}
    train = [it for it in train if not held_ids.intersection(it["event_ids"])]
    return ([it for it in train if "target" not in it], [it for it in train if "target" in it],
            [it for it in held if "target" not in it], [it for it in held if "target" in it])


def split_newest(pairs: Sequence[dict[str, Any]], fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held_out): the newest ``fraction`` of the pairs held out (at least one if fraction > 0
    and there are two pairs or more)."""
    if fraction <= 0 or len(pairs) < 2:
        return list(pairs), []
    n_held = min(len(pairs) - 1, max(1, round(fraction * len(pairs))))
    return list(pairs[:-n_held]), list(pairs[-n_held:])


def encode(tokenizer: Any, prompt: str, completion: str, max_length: int) -> list[int]:
    """Token ids of (prompt, completion) exactly as the reward service scores them."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    else:
        ids = tokenizer(prompt, completion, truncation=True, max_length=max_length)["input_ids"]
    return list(ids)


@torch.no_grad()
def pairwise_accuracy(model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], max_length: int) -> float:
    """Share of pairs the reward model scores chosen above rejected (NaN without pairs)."""
    if not pairs:
        return float("nan")
    model.eval()
    correct = 0
    for pair in pairs:
        rows = [encode(tokenizer, pair["prompt"], pair[side], max_length) for side in ("chosen", "rejected")]
        scores = score_rows(model, tokenizer, rows)  # (2,)
        correct += int(scores[0] > scores[1])
    return correct / len(pairs)


@torch.no_grad()
def pointwise_accuracy(model: Any, tokenizer: Any, points: Sequence[dict[str, Any]], max_length: int) -> float:
    """Share of rated points whose reward has the rating's sign (r > 0 for a rating above 0.5, r < 0 below);
    neutral ratings (exactly 0.5) are not counted. NaN without any."""
    signed = [p for p in points if p["target"] != 0.5]
    if not signed:
        return float("nan")
    model.eval()
    rows = [encode(tokenizer, p["prompt"], p["completion"], max_length) for p in signed]
    scores = torch.cat([score_rows(model, tokenizer, rows[i:i + 16]) for i in range(0, len(rows), 16)])  # (N,)
    targets = torch.tensor([p["target"] for p in signed])  # (N,)
    return float(((scores.cpu() > 0) == (targets > 0.5)).float().mean())


def score_rows(model: Any, tokenizer: Any, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Reward-model outputs r(x, y) of right-padded token rows, on the model's device: (N,)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (N, L)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, L)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(list(row), dtype=torch.long), 1
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()


# --- fitting -----------------------------------------------------------------------------------
def reward_model_loss(chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor, point_scores: torch.Tensor,
                      targets: torch.Tensor, pointwise_weight: float) -> torch.Tensor:
    """Bradley–Terry -log sigmoid(r_chosen - r_rejected - margin), mean over pairs (P,), plus
    ``pointwise_weight`` * BCE(sigmoid(r), target), mean over points (Q,). An empty side adds nothing."""
    loss = torch.zeros((), device=point_scores.device)
    if chosen.numel():
        loss = loss + -F.logsigmoid(chosen - rejected - margins).mean()
    if point_scores.numel() and pointwise_weight > 0:
        loss = loss + pointwise_weight * F.binary_cross_entropy_with_logits(point_scores, targets)
    return loss


def _cycle(n: int, batch: int, rng: random.Random) -> Iterator[list[int]]:
    """Minibatches of indices into n items, reshuffled every pass (empty forever when n is 0)."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from ([order[i:i + batch] for i in range(0, n, batch)] if n else [[]])


def fit_reward_model(model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]], cfg: LearnerConfig,
                     points: Sequence[dict[str, Any]] = ()) -> float:
    """Fits ``model`` (in place) for ``rm_max_steps`` AdamW steps, each on ``rm_batch_size`` pairs and
    ``rm_batch_size`` points (``reward_model_loss``); returns the mean loss over the steps."""
    max_length = cfg.rm_max_length * 2
    pair_rows = [(encode(tokenizer, p["prompt"], p["chosen"], max_length),
                  encode(tokenizer, p["prompt"], p["rejected"], max_length), float(p.get("margin", 0.0))) for p in pairs]
    weight = cfg.rm_pointwise_weight
    point_rows = [(encode(tokenizer, p["prompt"], p["completion"], max_length), float(p["target"]))
                  for p in points] if weight > 0 else []
    if not pair_rows and not point_rows:
        raise ValueError("nothing to fit: no pairs, and no points (or rm_pointwise_weight=0)")
    rng = random.Random(cfg.seed)
    pair_batches = _cycle(len(pair_rows), cfg.rm_batch_size, rng)
    point_batches = _cycle(len(point_rows), cfg.rm_batch_size, rng)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.rm_learning_rate,
                                  weight_decay=0.0)
    model.train()
    losses = []
    for _step in range(cfg.rm_max_steps):
        pb, qb = next(pair_batches), next(point_batches)
        rows = [pair_rows[i][0] for i in pb] + [pair_rows[i][1] for i in pb] + [point_rows[i][0] for i in qb]
        scores = score_rows(model, tokenizer, rows)  # (2p + q,)
        p = len(pb)
        margins = torch.tensor([pair_rows[i][2] for i in pb], device=scores.device)  # (p,)
        targets = torch.tensor([point_rows[i][1] for i in qb], device=scores.device)  # (q,)
        loss = reward_model_loss(scores[:p], scores[p:2 * p], margins, scores[2 * p:], targets, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses) / len(losses)


# --- SFT with TRL ------------------------------------------------------------------------------
def _trainer_args(cfg: LearnerConfig, work: Path, lr: float, batch: int) -> dict[str, Any]:
    # Gradient checkpointing (TRL's default) would stay switched on in the model we keep serving from.
    return dict(output_dir=str(work), max_steps=cfg.rm_max_steps, learning_rate=lr,
                per_device_train_batch_size=batch, logging_strategy="no", report_to=[], save_strategy="no",
                eval_strategy="no", use_cpu=not torch.cuda.is_available(), seed=cfg.seed, disable_tqdm=True,
                max_length=cfg.rm_max_length * 2, lr_scheduler_type="constant", dataloader_num_workers=0,
                gradient_checkpointing=False)


def sft_on_corrections(policy: Any, tokenizer: Any, examples: Sequence[dict[str, str]], cfg: LearnerConfig) -> float:
    """Supervised fine-tuning of the policy (in place) on {prompt, completion} with TRL's SFTTrainer."""
    import datasets
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="flywheel-sft-"))
    try:
        args = SFTConfig(**_trainer_args(cfg, work, cfg.learning_rate, min(len(examples), cfg.rm_batch_size)))
        trainer = SFTTrainer(model=policy, args=args, train_dataset=datasets.Dataset.from_list(list(examples)),
                             processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        result = trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    policy.config.use_cache = False
    return float(result.training_loss)


# --- reward replicas ------------------------------------------------------------------------------
class RewardReplicas:
    """GetModel / PushWeights on every reward replica, in parallel, with deadlines."""

    def __init__(self, config: LearnerConfig) -> None:
        self.config = config

    def versions(self) -> dict[str, int | Exception]:
        import grpc

        from flywheel.common.server import channel_options
        from flywheel.v1 import reward_pb2, reward_pb2_grpc

        metadata = [("authorization", f"Bearer {self.config.internal_token}")]

        def ask(target: str) -> int | Exception:
            try:
                with grpc.insecure_channel(target, options=channel_options(self.config.max_message_bytes)) as ch:
                    reply = reward_pb2_grpc.RewardServiceStub(ch).GetModel(
                        reward_pb2.GetModelRequest(), timeout=min(10.0, self.config.rpc_timeout), metadata=metadata)
                return int(reply.model_version)
            except grpc.RpcError as exc:
                return exc

        targets = list(self.config.rm_targets)
        with ThreadPoolExecutor(max_workers=max(1, min(len(targets), 16))) as pool:
            return dict(zip(targets, pool.map(ask, targets), strict=True))

    def push(self, targets: Sequence[str], state: Mapping[str, torch.Tensor], version: int,
             metadata: Mapping[str, str]) -> dict[str, str]:
        """Full push of ``state`` as ``version``; returns {target: error} for the failed ones."""
        from flywheel.common.weight_push import push_weights

        results = push_weights(list(targets), state, version, token=self.config.internal_token, stub="reward",
                               timeout=self.config.push_timeout, max_message_bytes=self.config.max_message_bytes,
                               metadata=dict(metadata), pusher="learner")
        return {t: repr(r) for t, r in results.items() if isinstance(r, Exception)}


# --- the scheduler and its bookkeeping --------------------------------------------------------------
@dataclass
class Fit:
    """One fit's outcome: what the checkpoint records and metrics.jsonl reports."""

    fit: int
    event_ids: list[str]
    train_pairs: int
    heldout_pairs: int
    heldout_accuracy: float
    previous_accuracy: float
    pushed: bool
    rm_version: int
    train_loss: float = float("nan")
    sft_examples: int = 0
    reason: str = ""
    train_points: int = 0
    heldout_points: int = 0
    heldout_pointwise_accuracy: float = float("nan")
    previous_pointwise_accuracy: float = float("nan")
    model: Any = field(default=None, repr=False)  # the candidate reward model (not checkpointed here)


class FeedbackLearning:
    """Reads the feedback stream, fits and publishes the reward model, keeps the ack bookkeeping."""

    def __init__(self, config: LearnerConfig, metrics: LearnerMetrics, redis: Any = None) -> None:
        self.config = config
        self.metrics = metrics
        self.redis = redis
        self.replicas = RewardReplicas(config)
        self.consumer: FeedbackConsumer | None = None
        self.buffer: list[FeedbackRecord] = []  # read, pending, not fitted yet
        self.windows: list[dict[str, Any]] = []  # committed fits (newest KEEP_WINDOWS)
        self.unacked: list[str] = []  # committed ids waiting for a checkpoint
        self.checkpointed: list[str] = []  # in a checkpoint, XACK not yet confirmed
        self.rewarded: list[str] = []  # used as direct rewards of the policy, not yet in a window
        self.rm_version = 0
        self.fits = 0
        self.consumed_total = 0
        self._pending_cursor: str | None = "0"  # after (re)start: re-read our own pending entries first
        self.model: Any = None
        self.tokenizer: Any = None

    # --- models and state -------------------------------------------------------------------------
    def load(self, checkpoint_rm: Path | None = None) -> None:
        """Loads the reward model (from a checkpoint, else ``reward_model``) and joins the group."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from flywheel.common.tiny_models import resolve_model

        path = str(checkpoint_rm) if checkpoint_rm is not None else resolve_model(self.config.reward_model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.truncation_side = "left"  # as the reward service: keep the completion's end
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        if self.redis is not None and self.consumer is None:
            self.consumer = FeedbackConsumer(self.redis, keys.FEEDBACK_GROUP, CONSUMER_NAME)

    def state_dict(self) -> dict[str, Any]:
        """Bookkeeping for the checkpoint (the model itself goes to checkpoint.REWARD_MODEL)."""
        return {"rm_version": self.rm_version, "fits": self.fits, "consumed_total": self.consumed_total,
                "windows": copy.deepcopy(self.windows), "unacked": list(self.unacked),
                "rewarded": list(self.rewarded)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rm_version = int(state["rm_version"])
        self.fits = int(state["fits"])
        self.consumed_total = int(state["consumed_total"])
        self.windows = list(state["windows"])
        self.rewarded = list(state.get("rewarded", []))  # checkpoints from before rating rewards have none
        self.metrics.reward_model_version.set(self.rm_version)

    def checkpoint_model(self) -> tuple[Any, Any] | None:
        """(model, tokenizer) to save with the checkpoint, once fitted (before, the base model is the state)."""
        return (self.model, self.tokenizer) if self.fits else None

    def trained_ids(self) -> set[str]:
        return {i for w in self.windows for i in w["event_ids"]}

    # --- reading ------------------------------------------------------------------------------------
    def poll(self) -> int:
        """Reads feedback into the buffer, up to ``feedback_batch``: after a restart our own pending
        entries first, then other consumers' stale ones (XAUTOCLAIM), then new ones. Returns how many."""
        assert self.consumer is not None, "load() joins the consumer group"
        before = len(self.buffer)
        while self._pending_cursor is not None and self._room():
            records = self._read_own_pending(self._room())
            if not records:
                self._pending_cursor = None  # caught up: from now on only new and reclaimed entries
            self._keep_fresh(records)
        if self._room():
            self._keep_fresh(self.consumer.reclaim(count=self._room()))
        if self._room():
            self._keep_fresh(self.consumer.read(count=self._room()))
        return len(self.buffer) - before

    def _room(self) -> int:
        return max(0, self.config.feedback_batch - len(self.buffer))

    def _keep_fresh(self, records: Sequence[FeedbackRecord]) -> None:
        """Buffers records not seen yet. Ids a checkpoint covers (killed before XACK) are acked and
        skipped; ids fitted but not checkpointed, or already buffered (XAUTOCLAIM hands our own idle
        entries back), are skipped."""
        assert self.consumer is not None
        covered = self.trained_ids() - set(self.unacked)
        seen = covered | set(self.unacked) | {r.event_id for r in self.buffer}
        stale = [r.event_id for r in records if r.event_id in covered]
        if stale:
            self.consumer.ack(stale)
            log.info("acked %d feedback events a checkpoint already covers", len(stale))
        self.buffer += [r for r in records if r.event_id not in seen]

    def _read_own_pending(self, count: int) -> list[FeedbackRecord]:
        """Entries delivered to this consumer and never acked, after ``_pending_cursor``."""
        assert self.consumer is not None and self._pending_cursor is not None
        reply = self.consumer.redis.xreadgroup(
            keys.FEEDBACK_GROUP, CONSUMER_NAME, {keys.FEEDBACK_STREAM: self._pending_cursor}, count=count
        )
        records = []
        for raw_id, fields in reply[0][1] if reply else []:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            self._pending_cursor = entry_id
            if not fields:  # trimmed from the stream while pending: nothing to train on
                self.consumer.ack([entry_id])
                continue
            try:
                records.append(FeedbackRecord.from_json(fields[b"record"], event_id=entry_id))
            except (KeyError, ValueError) as exc:
                self.consumer.dead_letter(entry_id, f"not a feedback record: {exc}", fields)
        return records

    # --- one fit ------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.config.rm_fit_every_steps == 0

    def maybe_fit(self, step: int, lock: threading.RLock, policy: Any = None, policy_tokenizer: Any = None) -> Fit | None:
        """Every ``rm_fit_every_steps`` steps with at least ``rm_min_new_events`` events read: fits a
        candidate on a copy of the reward model, then commits it (and SFTs the policy) under ``lock``.
        The caller must checkpoint (which calls ``after_checkpoint``: XACK), then ``publish``."""
        if not self.due(step):
            return None
        if not self.config.rating_rewards:  # with rating rewards, take_rated polled after this step's update:
            self.poll()  # reading more here would fit ratings the policy never got as rewards
        if len(self.buffer) < self.config.rm_min_new_events:
            return None
        window = self.buffer[: self.config.feedback_batch]
        fit = self._fit(window)
        version = self._next_version() if fit.pushed else self.rm_version  # GetModel: outside the lock
        with lock:
            if policy is not None and self.config.sft_on_corrections:
                examples = [e for r in window if (e := r.sft_example()) is not None]
                if examples:
                    sft_on_corrections(policy, policy_tokenizer, examples, self.config)
                    fit.sft_examples = len(examples)
            self._commit(fit, version)
            del self.buffer[: len(window)]
        return fit

    def _fit(self, window: Sequence[FeedbackRecord]) -> Fit:
        cfg, max_length = self.config, self.config.rm_max_length * 2
        count = lambda text: len(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        pairs = filter_long(records_to_pairs(window), count, cfg.rm_max_length, cfg.rm_max_length,
                            ("chosen", "rejected"))
        points = records_to_points(window) if cfg.rm_pointwise_weight > 0 else []
        points = filter_long(points, count, cfg.rm_max_length, cfg.rm_max_length, ("completion",))
        train, train_points, held, held_points = split_window(window, pairs, points, cfg.rm_holdout_fraction)
        fit = Fit(self.fits + 1, [r.event_id for r in window], len(train), len(held), float("nan"),
                  float("nan"), False, self.rm_version, train_points=len(train_points), heldout_points=len(held_points))
        if not train and not train_points:
            fit.reason = "no preference pairs or ratings in the window"
            return fit
        candidate = copy.deepcopy(self.model)
        fit.train_loss = fit_reward_model(candidate, self.tokenizer, train, cfg, train_points)
        fit.previous_accuracy = pairwise_accuracy(self.model, self.tokenizer, held, max_length)
        fit.heldout_accuracy = pairwise_accuracy(candidate, self.tokenizer, held, max_length)
        fit.previous_pointwise_accuracy = pointwise_accuracy(self.model, self.tokenizer, held_points, max_length)
        fit.heldout_pointwise_accuracy = pointwise_accuracy(candidate, self.tokenizer, held_points, max_length)
        # Pairwise accuracy gates (rankings are what the policy optimises against); a window whose held-out
        # slice has only ratings is gated on their sign agreement instead. NaN compares False: no gate.
        new, old, what = fit.heldout_accuracy, fit.previous_accuracy, "accuracy"
        if not held:
            new, old, what = fit.heldout_pointwise_accuracy, fit.previous_pointwise_accuracy, "pointwise accuracy"
        if new < old:
            fit.reason = f"held-out {what} {new:.3f} is below the current model's {old:.3f}: not pushed"
            return fit
        fit.pushed, fit.model = True, candidate
        return fit

    def _commit(self, fit: Fit, version: int) -> None:
        """Makes ``fit`` part of the learner state (the next checkpoint holds it). Caller holds the lock."""
        self.fits = fit.fit
        if fit.pushed:
            self.model = fit.model
            fit.rm_version = self.rm_version = version
        fit.model = None
        record = {k: v for k, v in asdict(fit).items() if k != "model"}
        self.windows = [*self.windows, record][-KEEP_WINDOWS:]
        self.unacked += fit.event_ids
        fitted = set(fit.event_ids)  # from now on the window marks them (acked and skipped when read again)
        self.rewarded = [i for i in self.rewarded if i not in fitted]
        outcome = "pushed" if fit.pushed else "skipped"
        self.metrics.rm_fits.labels(outcome).inc()
        if fit.heldout_pairs:
            self.metrics.rm_heldout_accuracy.set(fit.heldout_accuracy)
        log.info("reward-model fit %d on %d events (%d / %d train / held-out pairs, %d / %d points): %s%s", fit.fit,
                 len(fit.event_ids), fit.train_pairs, fit.heldout_pairs, fit.train_points, fit.heldout_points, outcome,
                 f" ({fit.reason})" if fit.reason else f" as version {fit.rm_version}")

    def take_rated(self) -> list[FeedbackRecord]:
        """Rated logged completions read but not yet used as direct rewards (rating_rewards): polls the
        stream, marks them used. The marks are checkpointed with the policy they updated, so a restart
        from that checkpoint never uses them again, and one from an older checkpoint uses them again."""
        if self.consumer is not None:
            self.poll()
        used = set(self.rewarded)
        fresh = [r for r in self.buffer if r.event_id not in used and r.rating is not None and r.completion is not None
                 and r.completion.token_ids and r.prompt_token_ids]
        self.rewarded += [r.event_id for r in fresh]
        return fresh

    def _next_version(self) -> int:
        served = [v for v in self.replicas.versions().values() if isinstance(v, int)]
        return max([self.rm_version, *served]) + 1

    # --- between steps, and after the checkpoint ----------------------------------------------------
    def run(self, step: int, lock: threading.RLock, policy: Any, policy_tokenizer: Any,
            save_checkpoint: Callable[[], Any], metrics_log: Any) -> Fit | None:
        """The learner's hook between steps: maybe fit, then checkpoint (which acks), then push."""
        fit = self.maybe_fit(step, lock, policy, policy_tokenizer)
        if fit is not None:
            save_checkpoint()  # holds the fitted model and its data window; acks the window's events
            metrics_log.write(fit_record(fit))
        if self.due(step) or fit is not None:
            self.publish()  # also re-pushes to a replica that restarted (it serves version 0 again)
        return fit

    def after_checkpoint(self, state: Any) -> None:
        """XACKs the ids a just-written checkpoint (whose ``state_dict`` was ``state``) covers. A failed
        XACK is retried after the next checkpoint; after a restart the ids are acked when read again."""
        covered = set(state["unacked"])
        self.unacked = [i for i in self.unacked if i not in covered]
        self.checkpointed += [i for i in state["unacked"] if i not in self.checkpointed]
        if not self.checkpointed or self.consumer is None:
            return
        try:
            self.consumer.ack(self.checkpointed)
        except Exception:  # Redis down: the ids stay pending and are retried
            log.exception("XACK of %d feedback events failed; retrying after the next checkpoint",
                          len(self.checkpointed))
            return
        self.consumed_total += len(self.checkpointed)
        self.metrics.feedback_events_consumed.inc(len(self.checkpointed))
        self.checkpointed = []

    def publish(self) -> dict[str, str]:
        """Makes every reward replica serve our version (pushing where it does not); {target: error}."""
        if self.rm_version == 0:  # nothing fitted and pushed yet: the replicas serve the base model
            return {}
        versions = self.replicas.versions()
        failed = {t: repr(v) for t, v in versions.items() if not isinstance(v, int)}
        reachable = {t: v for t, v in versions.items() if isinstance(v, int)}
        ahead = max(reachable.values(), default=0)
        if ahead > self.rm_version:  # a killed run pushed past our checkpoint: jump over it
            log.warning("a reward replica serves version %d, ahead of ours (%d): pushing ours as %d",
                        ahead, self.rm_version, ahead + 1)
            self.rm_version = ahead + 1
        targets = [t for t, v in reachable.items() if v != self.rm_version]
        if targets:
            state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            failed.update(self.replicas.push(targets, state, self.rm_version, {"fit": str(self.fits)}))
        self.metrics.reward_model_version.set(self.rm_version)
        for target, error in failed.items():
            log.warning("reward-model version %d not on %s: %s", self.rm_version, target, error)
        return failed


def fit_record(fit: Fit) -> dict[str, Any]:
    """The metrics.jsonl line of a fit (its event ids: the audit trail of what was trained on)."""
    return {"event": "rm_fit", **{k: v for k, v in asdict(fit).items() if k != "model"}}

