"""Learner configuration: the service fields, then the PPO hyperparameters (paper names)."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.common.config import ConfigError, ServerConfig

ALGORITHMS = ("ppo", "grpo", "rloo", "rebel", "dpo")
CRITIC_FREE = ("grpo", "rloo", "rebel", "dpo")


@dataclass(frozen=True)
class LearnerConfig(ServerConfig):
    port: int = 50054
    metrics_port: int = 9104
    policy_model: str = "tiny://llama"
    """Initial policy: hub id, local path or tiny://llama."""
    reward_target: str = "127.0.0.1:50052"
    """Reward service address."""
    reward_scorer: str = ""
    """Named scorer configuration of the reward service; empty selects its default."""
    generator_targets: tuple[str, ...] = ("127.0.0.1:50051",)
    """Generator replicas (comma list of host:port), or one dns:///NAME:PORT resolving to all of them."""
    checkpoint_dir: str = "~/.local/share/flywheel/checkpoints"
    """Where atomic checkpoints are written and resumed from."""
    run_dir: str = "~/.local/share/flywheel/runs/default"
    """Metrics JSONL and plots."""
    algorithm: str = "ppo"
    """'ppo', 'grpo', 'rloo', 'rebel' or 'dpo' (online DPO on best-vs-worst of n samples ranked by the reward service)."""
    autostart: bool = False
    """Start training as soon as the services are reachable (otherwise wait for Resume)."""
    total_steps: int = 0
    """Stop (and checkpoint) after this many PPO steps; 0 trains until stopped."""
    seed: int = 0
    """Seed of torch, the prompt order and the sampling seeds sent to the generator."""

    # --- prompts --------------------------------------------------------------------------
    prompts_file: str = ""
    """JSONL of prompts ({"prompt": ...} per line), or builtin://sentiment for sentence openings."""
    prompt_stream: bool = False
    """Also take fresh production prompts from the Redis stream flywheel:prompts (first, before the file)."""
    prompt_stream_fraction: float = 1.0
    """With prompt_stream: share (0..1) of each step's prompts taken from the stream when it has them; the
    rest (and any shortfall) from prompts_file. 1.0 = stream first, the file only tops up."""

    # --- rollouts -------------------------------------------------------------------------
    prompts_per_step: int = 4
    """Prompts per rollout batch."""
    samples_per_prompt: int = 2
    """Completions sampled per prompt (n); GRPO/RLOO need >= 2, REBEL an even number."""
    max_new_tokens: int = 16
    """Completion length limit; longer completions are truncated (finish_reason LENGTH)."""
    temperature: float = 1.0
    """Sampling temperature; the learner divides its logits by the same value."""
    top_p: float = 1.0
    """Nucleus threshold sent to the generator (1.0 keeps the exact policy distribution)."""
    missing_eos_penalty: float = 0.0
    """Added to the score of completions that hit max_new_tokens without EOS (e.g. -1.0); 0 = off."""

    # --- PPO --------------------------------------------------------------------------------
    learning_rate: float = 1e-5
    """Adam learning rate (policy and value head)."""
    adam_eps: float = 1e-5
    """Adam epsilon (CleanRL's 1e-5 rather than torch's 1e-8)."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up over this many PPO steps, constant afterwards."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    minibatch_size: int = 4
    """Samples per gradient step; must divide prompts_per_step * samples_per_prompt."""
    forward_batch_size: int = 32
    """Rows per no-grad forward pass when computing rollout logprobs, values and reference logprobs."""
    clip_coef: float = 0.2
    """PPO surrogate clipping epsilon."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    clip_vf: float = 0.2
    """Value clipping range around the rollout-time values."""
    gamma: float = 1.0
    """Discount of GAE."""
    gae_lambda: float = 0.95
    """Lambda of GAE."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance over the batch."""
    init_kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty against the frozen reference."""
    target_kl: float = 0.0
    """Adaptive KL controller target (Ziegler et al.); 0 keeps kl_coef fixed."""
    kl_horizon: int = 10_000
    """Adaptive KL controller horizon, in samples."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    shared_backbone: bool = False
    """Value head on the policy's backbone (cheap) instead of a separate critic copy (the paper's choice)."""
    rebel_eta: float = 1.0
    """REBEL's eta (Gao et al. 2024): regresses (1/eta) * difference of log-ratios onto the reward difference."""
    dpo_beta: float = 0.1
    """Online DPO's beta (Rafailov et al. 2023): strength of the implicit KL constraint to the reference."""
    dpo_min_margin: float = 0.0
    """Online DPO: a prompt gives a pair only when its best and worst scores differ by more than this."""

    # --- learning from feedback (the feedback stream's consumer group) --------------------------
    feedback_learning: bool = False
    """Consume the feedback stream: fit the reward model on comparisons/corrections/ratings and push it."""
    reward_model: str = "tiny://reward"
    """Reward model the learner warm-starts from: the same model the reward service serves."""
    reward_targets: tuple[str, ...] = ()
    """Reward replicas (comma list of host:port) that get new reward-model versions; empty = (reward_target,)."""
    rm_fit_every_steps: int = 5
    """Consider a reward-model fit every this many policy steps."""
    rm_min_new_events: int = 16
    """Fit only once at least this many unconsumed feedback events have been read."""
    rm_holdout_fraction: float = 0.2
    """Newest share of a fit's preference pairs held out for pairwise accuracy (0 = push without check)."""
    rm_learning_rate: float = 1e-4
    """Reward-model AdamW learning rate (constant; the learner's Bradley–Terry + pointwise fit)."""
    rm_max_steps: int = 20
    """Optimizer steps per reward-model fit."""
    rm_batch_size: int = 8
    """Preference pairs per reward-model optimizer step."""
    rm_max_length: int = 256
    """Token budget of a prompt and of a response; longer feedback is dropped (training/data.filter_long)."""
    sft_on_corrections: bool = False
    """Also fine-tune the policy on corrections (TRL SFTTrainer), pushed with the next policy version."""
    feedback_batch: int = 64
    """Most feedback events read for one fit (the rest wait for the next)."""
    rm_pointwise_weight: float = 0.5
    """Weight of the pointwise loss on ratings (BCE of sigmoid(r(x, y)) against the rating in [0, 1]) added to
    the Bradley–Terry loss of the reward-model fit; 0 = ratings only feed best-vs-worst pairs."""
    rating_rewards: bool = False
    """After each policy step, an off-policy policy-gradient update on the rated logged completions (the
    rating as reward, importance-weighted by the generator's behaviour logprobs); needs feedback_learning."""
    rating_ratio_clip: float = 2.0
    """Rating rewards: per-token importance ratio pi_current / pi_behaviour is clipped to [0, this]."""
    rating_reward_weight: float = 1.0
    """Rating rewards: weight of the off-policy loss (scales its gradient step)."""
    rating_baseline: float = 0.5
    """Rating rewards: subtracted from the rating in [0, 1] (0.5 = the neutral point: thumb up +0.5, down -0.5)."""

    # --- weights, checkpoints ----------------------------------------------------------------
    delta_push: bool = True
    """Push only changed tensors (against the version the replica has); full pushes otherwise."""
    push_timeout: float = 120.0
    """Deadline of one weight push to one replica, in seconds."""
    rpc_timeout: float = 60.0
    """Deadline of one Generate or Score call, in seconds."""
    rpc_max_backoff: float = 30.0
    """Longest wait between retries of an unavailable service, in seconds."""
    checkpoint_every: int = 10
    """Checkpoint every this many steps (0 = only on Checkpoint RPC and at shutdown)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept; older ones are deleted."""

    # --- async rollouts (generation of batch k+1 overlaps training on batch k) -----------------
    mode: str = "sync"
    """'sync' (generate -> score -> train) or 'async' (a rollout thread fetches the next batch during training)."""
    max_policy_lag: int = 1
    """Async: samples more than this many versions behind the policy being trained are dropped or down-weighted."""
    stale_policy: str = "drop"
    """Async: what happens to samples over max_policy_lag: 'drop' (refill from the next batch) or 'downweight'."""
    stale_downweight: float = 0.5
    """Async, stale_policy=downweight: a sample's loss weight is this to the power of its versions over the lag."""
    rollout_prefetch: int = 1
    """Async: batches generated ahead of training (each one adds up to one version of staleness)."""
    behaviour_ratio_cap: float = 2.0
    """Async (decoupled PPO): truncation of the importance weight pi_prox / pi_behav (0 = none)."""

    # --- policy registry and rollback guard -----------------------------------------------------
    keep_policy_snapshots: int = 5
    """Weight snapshots kept under checkpoint_dir/policies/ (newest, plus promoted ones); 0 disables rollback."""
    guard_enabled: bool = False
    """After each step, evaluate the new version and roll back automatically when a bound is violated."""
    guard_min_reward_drop: float = 0.0
    """Guard: roll back when the eval reward falls this far below the promoted version's (<= 0 = no check)."""
    guard_max_kl: float = 0.0
    """Guard: roll back when KL(new version || reference) on the eval prompts exceeds this (<= 0 = no check)."""
    guard_eval_prompts: int = 8
    """Guard: held-out prompts evaluated per step (samples_per_prompt completions each)."""
    eval_prompts_file: str = ""
    """Guard: JSONL (or builtin://sentiment) of held-out eval prompts; empty = the first prompts of prompts_file."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm={self.algorithm!r}: set ppo, grpo, rloo, rebel or dpo")
        if not self.generator_targets:
            raise ConfigError(
                "generator_targets is empty: set FLYWHEEL_LEARNER_GENERATOR_TARGETS=host:port[,host:port]"
            )
        self._check_positive()
        self._check_batches()
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.temperature <= 0:
            raise ConfigError(
                f"temperature={self.temperature}: PPO needs sampling, set a temperature > 0 (1.0 is exact)"
            )
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError("gamma and gae_lambda must be in [0, 1]")
        if self.init_kl_coef < 0 or self.target_kl < 0:
            raise ConfigError("init_kl_coef and target_kl must be >= 0 (target_kl 0 = fixed coefficient)")
        self._check_feedback()
        self._check_async_and_guard()

    def _check_positive(self) -> None:
        for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs",
                     "minibatch_size", "forward_batch_size", "keep_checkpoints", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("learning_rate", "clip_coef", "clip_vf", "max_grad_norm", "rebel_eta", "push_timeout",
                     "rpc_timeout", "rpc_max_backoff", "adam_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("checkpoint_every", "total_steps", "lr_warmup_steps", "vf_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")

    def _check_batches(self) -> None:
        batch = self.batch_size
        if batch % self.minibatch_size:
            raise ConfigError(
                f"minibatch_size={self.minibatch_size} does not divide the batch of {batch} samples "
                f"(prompts_per_step * samples_per_prompt): set minibatch_size to a divisor of {batch}"
            )
        if self.algorithm in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ConfigError(
                f"algorithm={self.algorithm} needs a group per prompt: set samples_per_prompt >= 2"
            )
        if self.algorithm in ("grpo", "rloo", "rebel") and self.minibatch_size % self.samples_per_prompt:
            raise ConfigError(
                f"algorithm={self.algorithm} keeps each prompt's samples together: set minibatch_size to a "
                f"multiple of samples_per_prompt={self.samples_per_prompt}"
            )
        if self.algorithm == "dpo" and self.samples_per_prompt < 2:
            raise ConfigError("algorithm=dpo ranks samples of one prompt: set samples_per_prompt >= 2")
        if self.algorithm == "rebel" and self.samples_per_prompt % 2:
            raise ConfigError("algorithm=rebel compares pairs: set samples_per_prompt to an even number (2)")

    def _check_feedback(self) -> None:
        for name in ("rm_fit_every_steps", "rm_min_new_events", "rm_max_steps", "rm_batch_size", "feedback_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.rm_holdout_fraction < 1:
            raise ConfigError(f"rm_holdout_fraction={self.rm_holdout_fraction}: set a share in [0, 1) (0 = no check)")
        if self.rm_learning_rate <= 0 or self.dpo_beta <= 0:
            raise ConfigError("rm_learning_rate and dpo_beta must be > 0")
        if self.rm_max_length < 8:
            raise ConfigError(f"rm_max_length={self.rm_max_length} must be at least 8")
        if self.feedback_batch < self.rm_min_new_events:
            raise ConfigError(
                f"feedback_batch={self.feedback_batch} < rm_min_new_events={self.rm_min_new_events}: a fit could "
                f"never start; set feedback_batch >= {self.rm_min_new_events}"
            )
        if self.feedback_learning and not self.reward_model:
            raise ConfigError("feedback_learning needs reward_model: set the model the reward service serves")
        if self.rm_pointwise_weight < 0 or self.rating_reward_weight < 0 or self.rating_ratio_clip <= 0:
            raise ConfigError("rm_pointwise_weight and rating_reward_weight must be >= 0, rating_ratio_clip > 0")
        if not 0 <= self.rating_baseline <= 1:
            raise ConfigError(f"rating_baseline={self.rating_baseline}: ratings are in [0, 1], set a value there")
        if self.rating_rewards and not self.feedback_learning:
            raise ConfigError("rating_rewards reads ratings through the feedback consumer: set feedback_learning=true")
        if not 0 <= self.prompt_stream_fraction <= 1:
            raise ConfigError(f"prompt_stream_fraction={self.prompt_stream_fraction}: set a share in [0, 1]")
        if self.prompt_stream and self.prompt_stream_fraction < 1 and not self.prompts_file:
            raise ConfigError(
                f"prompt_stream_fraction={self.prompt_stream_fraction} mixes in a dataset: set prompts_file "
                "(or prompt_stream_fraction=1.0 for the stream alone)"
            )

    def _check_async_and_guard(self) -> None:
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"mode={self.mode!r}: set 'sync' or 'async'")
        if self.stale_policy not in ("drop", "downweight"):
            raise ConfigError(f"stale_policy={self.stale_policy!r}: set 'drop' or 'downweight'")
        if self.max_policy_lag < 0 or self.keep_policy_snapshots < 0 or self.behaviour_ratio_cap < 0:
            raise ConfigError("max_policy_lag, keep_policy_snapshots and behaviour_ratio_cap must be >= 0")
        if not 0 < self.stale_downweight <= 1:
            raise ConfigError(f"stale_downweight={self.stale_downweight} must be in (0, 1]")
        if not 1 <= self.rollout_prefetch <= 8:
            raise ConfigError(f"rollout_prefetch={self.rollout_prefetch}: set 1..8 batches")
        if self.guard_eval_prompts < 1:
            raise ConfigError(f"guard_eval_prompts={self.guard_eval_prompts} must be at least 1")
        if self.guard_enabled and self.keep_policy_snapshots == 0:
            raise ConfigError("guard_enabled needs weight snapshots to roll back to: set keep_policy_snapshots >= 1")
        if self.guard_enabled and not (self.eval_prompts_file or self.prompts_file):
            raise ConfigError("guard_enabled evaluates held-out prompts: set eval_prompts_file (or prompts_file)")

    @property
    def rm_targets(self) -> tuple[str, ...]:
        """Reward replicas that receive reward-model versions."""
        return self.reward_targets or (self.reward_target,)

    @property
    def batch_size(self) -> int:
        """Samples per rollout batch."""
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def uses_critic(self) -> bool:
        """Whether the algorithm trains a value function (PPO) or uses group baselines."""
        return self.algorithm not in CRITIC_FREE
