"""Learner configuration: the service fields, then the PPO hyperparameters (paper names)."""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.common.config import ConfigError, ServerConfig

ALGORITHMS = ("ppo", "grpo", "rloo", "rebel")
CRITIC_FREE = ("grpo", "rloo", "rebel")


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
    """'ppo', 'grpo', 'rloo' or 'rebel'."""
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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm={self.algorithm!r}: set ppo, grpo, rloo or rebel")
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
        if self.algorithm == "rebel" and self.samples_per_prompt % 2:
            raise ConfigError("algorithm=rebel compares pairs: set samples_per_prompt to an even number (2)")

    @property
    def batch_size(self) -> int:
        """Samples per rollout batch."""
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def uses_critic(self) -> bool:
        """Whether the algorithm trains a value function (PPO) or uses group baselines."""
        return self.algorithm not in CRITIC_FREE
